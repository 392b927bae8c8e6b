"""What a step minimises and how fast: the language-model loss of a batch and the learning rate."""
import math

import torch
import torch.nn.functional as F

from model.image import normalize

from .data import IGNORE


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the supervised tokens; logit t predicts label t + 1 (fp32)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def forward_loss(module, batch: dict, device) -> torch.Tensor:
    kw = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "image" in kw:   # loaders pass uint8 pixels (4x less to copy between processes); normalise here
        kw["image"] = normalize(kw["image"])
    logits = module(**kw)[0]
    return lm_loss(logits, batch["labels"])


def learning_rate(args, iteration: int) -> float:
    """LR for the optimizer step that completes iteration `iteration + 1` (sat's AnnealingLR shape):
    linear warm-up over warmup * decay_iters steps, then decay to lr * lr_decay_ratio at decay_iters."""
    decay_iters = args.lr_decay_iters or args.train_iters
    warmup = int(args.warmup * decay_iters)
    step = iteration + 1
    if warmup > 0 and step <= warmup:
        return args.lr * step / warmup
    if args.lr_decay_style == "constant":
        return args.lr
    low = args.lr * args.lr_decay_ratio
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    if args.lr_decay_style == "linear":
        return args.lr - (args.lr - low) * progress
    if args.lr_decay_style == "cosine":
        return low + (args.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (args.lr_decay_ratio ** progress)  # exponential
