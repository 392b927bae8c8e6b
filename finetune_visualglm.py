"""Fine-tune VisualGLM (LoRA, QLoRA, P-tuning v2), or train all of its weights, with DeepSpeed.

    # one CPU process (tests, machines without a GPU)
    python finetune_visualglm.py --from_pretrained visualglm-6b --train-data fewshot-data/dataset.json \
        --use_lora --layer_range 0 14 --train-iters 300 --batch-size 4 --save ./checkpoints
    # several GPUs or nodes (NCCL): the DeepSpeed launcher, optionally with a hostfile
    deepspeed --num_gpus 8 finetune_visualglm.py --fp16 --zero-stage 1 ...   (see finetune/*.sh)
    # train every weight of a new model from a config (random init)
    python finetune_visualglm.py --mode pretrain --from_config model_config.json --tokenizer <dir> ...

The flags are those of the original script (sat's training flags plus --max_source_length,
--max_target_length, --lora_rank, --layer_range, --pre_seq_len, --use_lora, --use_qlora, --use_ptuning,
--ignore_pad_token_for_loss). Differences from sat's trainer: `--mode pretrain` trains all weights
(no adapters); `--load <run dir>` resumes in both modes (weights, optimizer, iteration); no "auto
warm-up" at 5 % of the learning rate; batches are padded to their longest row, not to a fixed length.

Data (spec 8.4): a JSON list or JSON Lines file of
    {"img": "x.png", "prompt": "question", "label": "answer"}
    {"img": "x.png", "conversations": [{"prompt": q1, "label": a1}, {"prompt": q2, "label": a2}]}
("conversations" may also be role/content messages; every answer becomes one sample with the turns
before it as history; "img": null trains without an image; "lang": "en" uses the English template).
Images are looked up relative to the dataset file's folder, then its parent, then the working folder.
Tokens: ids("<img>") + image_length placeholders + ids("</img>问：{prompt}\\n答：") (truncated to
max_source_length - 1) + [gMASK] <sop> + ids(label) (truncated to max_target_length - 2) + <eop>;
only <sop>, the answer and <eop> are targets.

A run writes <save>/<experiment-name>-<month-day-hour-minute>/ in sat format: model_config.json,
latest, <iteration>/mp_rank_00_model_states.pt ({"module": tensors}, weights-only loadable), the
tokenizer files, train_log.jsonl, and <iteration>/deepspeed/ (optimizer state, for --load). Each
iteration folder is written under a temporary name and renamed into place with a complete.json, and
`latest` is updated after it, so a kill or a full disk never leaves a half-written checkpoint in use;
--load resumes from the newest complete iteration.
"""
import argparse
import datetime
import functools
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import model.sat  # noqa: E402,F401  (sat compatibility fixes before sat is imported)
from model.prompts import build_prompt, encode_prompt  # noqa: E402
from model.image import ImageLoadError, load_image, normalize, open_image, pixels_uint8  # noqa: E402

IGNORE = -100


def log(*parts, rank0_only=True):
    if not rank0_only or _rank() == 0:
        print(*parts, flush=True)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))


# ==============================================================================================
# command line

def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    from model.sat.finetune import FineTuneVisualGLMModel
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--from_pretrained", default="visualglm-6b",
                   help="sat checkpoint: a name in $SAT_HOME, a bundled model or a folder (also a fine-tune run)")
    g.add_argument("--from_config", default=None,
                   help="model_config.json to build a randomly initialised model from (instead of --from_pretrained)")
    g.add_argument("--tokenizer", default=None, help="folder with ice_text.model (default: found with the checkpoint)")
    g.add_argument("--mode", default="finetune", choices=["finetune", "pretrain"],
                   help="finetune: only the adapters train; pretrain: every weight trains (no adapters)")
    g.add_argument("--model-parallel-size", type=int, default=1, help="only 1 is supported")
    g.add_argument("--skip-init", action="store_true", help="accepted for compatibility (weights are never initialised twice)")
    g.add_argument("--checkpoint-activations", action="store_true", help="recompute GLM activations in backward")
    g.add_argument("--checkpoint-num-layers", type=int, default=1)
    FineTuneVisualGLMModel.add_model_specific_args(p)  # --pre_seq_len --lora_rank --use_* --layer_range

    g = p.add_argument_group("data")
    g.add_argument("--train-data", nargs="+", default=None,
                   help="JSON / JSON Lines dataset file(s); synthetic:<samples>[:<seed>] draws synthetic shape "
                        "scenes on the fly (synthetic/stream.py)")
    g.add_argument("--valid-data", nargs="*", default=None)
    g.add_argument("--test-data", nargs="*", default=None)
    g.add_argument("--split", default="1", help="train,valid,test weights to split --train-data when no --valid-data")
    g.add_argument("--max_source_length", type=int, default=64)
    g.add_argument("--max_target_length", type=int, default=256)
    g.add_argument("--ignore_pad_token_for_loss", type=_str2bool, nargs="?", const=True, default=True)
    g.add_argument("--source_prefix", default="", help="text put before every question")
    g.add_argument("--english", action="store_true", help="Q:/A: template for entries without a \"lang\" key")
    g.add_argument("--num-workers", type=int, default=1, help="data loader worker processes (0: in process)")
    g.add_argument("--resume-dataloader", action="store_true", help="with --load, continue the data order")

    g = p.add_argument_group("training")
    g.add_argument("--experiment-name", default="finetune-visualglm")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--epochs", type=int, default=None, help="alternative to --train-iters")
    g.add_argument("--batch-size", type=int, default=4, help="micro-batch per GPU / process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=1.0e-4)
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "exponential"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=float, default=0.01, help="fraction of the decay iterations")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--gradient-clipping", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    g.add_argument("--deepspeed", action="store_true", help="accepted for compatibility (DeepSpeed is always used)")
    g.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON used as the base of the generated config")
    g.add_argument("--distributed-backend", default=None, help="nccl or gloo (default: nccl with CUDA, else gloo)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")

    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--save", default=None, help="folder for runs (nothing is saved without it)")
    g.add_argument("--save-interval", type=int, default=5000)
    g.add_argument("--load", default=None, help="a run folder to resume (weights, optimizer state, iteration)")
    g.add_argument("--no-save-rng", action="store_true", help="do not store RNG states with the optimizer state")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after this iteration")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    errors = []
    if not args.train_data:
        errors.append("--train-data is required")
    if args.model_parallel_size != 1:
        errors.append("--model-parallel-size must be 1 (model parallel training is not supported)")
    if args.zero_stage == 3:
        errors.append("--zero-stage 3 is not supported (it partitions the weights); use 0, 1 or 2")
    if args.fp16 and args.bf16:
        errors.append("choose one of --fp16 and --bf16")
    if args.train_iters is not None and args.epochs is not None:
        errors.append("give --train-iters or --epochs, not both")
    for flag in ("--batch-size", "--gradient-accumulation-steps", "--max_source_length", "--log-interval",
                 "--eval-iters", "--save-interval"):
        if getattr(args, flag[2:].replace("-", "_")) < 1:
            errors.append(f"{flag} must be >= 1")
    if args.max_target_length < 2:
        errors.append("--max_target_length must be >= 2 (<sop> and <eop> need room)")
    adapters = args.use_lora or args.use_qlora or args.use_ptuning
    if args.mode == "pretrain" and adapters:
        errors.append("--mode pretrain trains every weight; --use_lora/--use_qlora/--use_ptuning are for --mode finetune")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    if args.use_lora and args.use_qlora:
        log("warning: --use_lora and --use_qlora both given; LoRA takes precedence (as in the original)")
        args.use_qlora = False
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    return args


# ==============================================================================================
# data

class DataError(ValueError):
    """A dataset file or entry is malformed; the message names the file and the entry."""


@dataclass
class Sample:
    input_ids: List[int]
    labels: List[int]
    context_length: int          # index of <sop>
    pre_image: int               # index of the first image placeholder, -1 without an image
    image: Optional[Path]
    where: str                   # "file.json[3]" for error messages


def read_entries(path: Path):
    """[(where, entry)] from a JSON list or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"Cannot read dataset file {path}: {e}") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from e
        entries = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    else:
        entries = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); a dataset is a JSON list or one "
                                f"JSON object per line.") from e
    if not entries:
        raise DataError(f"{path} contains no entries.")
    return entries


_USER_ROLES = {"user", "human", "question", "q"}
_BOT_ROLES = {"assistant", "gpt", "bot", "model", "answer", "a"}


def entry_turns(entry, where: str):
    """[(prompt, label)] of one entry, in order."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: an entry must be a JSON object, got {type(entry).__name__}.")
    if "img" not in entry:
        raise DataError(f"{where}: missing field 'img' (use \"img\": null for a text-only entry).")
    if "conversations" in entry:
        conv = entry["conversations"]
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{where}: 'conversations' must be a non-empty list.")
        if all(isinstance(t, dict) and ("prompt" in t or "label" in t) for t in conv):
            turns = []
            for i, t in enumerate(conv):
                for key in ("prompt", "label"):
                    if not isinstance(t.get(key), str):
                        raise DataError(f"{where}: conversations[{i}] needs a string field '{key}'.")
                turns.append((t["prompt"], t["label"]))
            return turns
        messages = []
        for i, m in enumerate(conv):
            role = str(m.get("role", m.get("from", ""))).lower() if isinstance(m, dict) else ""
            text = m.get("content", m.get("value")) if isinstance(m, dict) else None
            if role not in _USER_ROLES | _BOT_ROLES or not isinstance(text, str):
                raise DataError(f"{where}: conversations[{i}] must be {{\"prompt\", \"label\"}} or "
                                f"{{\"role\": user|assistant, \"content\": text}}.")
            messages.append((role in _USER_ROLES, text))
        if len(messages) % 2 or any(is_user != (i % 2 == 0) for i, (is_user, _) in enumerate(messages)):
            raise DataError(f"{where}: conversation messages must alternate user, assistant, ... and end "
                            f"with an assistant message.")
        return [(messages[i][1], messages[i + 1][1]) for i in range(0, len(messages), 2)]
    for key in ("prompt", "label"):
        if key not in entry:
            raise DataError(f"{where}: missing field '{key}' (an entry needs img, prompt and label, "
                            f"or img and conversations).")
        if not isinstance(entry[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(entry[key]).__name__}.")
    return [(entry["prompt"], entry["label"])]


def resolve_image(img, dataset_file: Path, where: str) -> Optional[Path]:
    if img is None:
        return None
    if not isinstance(img, str) or not img.strip():
        raise DataError(f"{where}: 'img' must be a path (or null), got {img!r}.")
    path = Path(img).expanduser()
    candidates = [path] if path.is_absolute() else \
        list(dict.fromkeys([dataset_file.parent / path, dataset_file.parent.parent / path, Path.cwd() / path]))
    for candidate in candidates:
        if candidate.is_file():
            try:
                with open_image(candidate):      # raster formats only, as at inference
                    pass
            except OSError as e:
                raise DataError(f"{where}: image {candidate} is not a readable image ({e}).") from e
            return candidate
    raise DataError(f"{where}: image '{img}' not found (looked at {', '.join(str(c) for c in candidates)}).")


def encode_sample(tokenizer, prompt: str, label: str, has_image: bool, image_length: int,
                  max_source_length: int, max_target_length: int, ignore_pad: bool = True):
    """Token ids and labels of one example (spec 8.4). `prompt` is the full text prompt built by
    model.chat.build_prompt. Returns (input_ids, labels, context_length, pre_image, truncated)."""
    ids, pre_image = encode_prompt(tokenizer, prompt, image_length if has_image else 0)
    tail = [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert ids[-2:] == tail, "the prompt should end with [gMASK] <sop>"
    a = ids[:-2]
    b = tokenizer.encode(label, add_special_tokens=False)
    truncated = len(a) > max_source_length - 1 or len(b) > max_target_length - 2
    a, b = a[:max_source_length - 1], b[:max_target_length - 2]
    input_ids = tokenizer.build_inputs_with_special_tokens(a, b)   # a [gMASK] <sop> b <eop>
    context_length = len(a) + 1
    labels = [IGNORE] * context_length + input_ids[context_length:]
    if ignore_pad:
        labels = [IGNORE if t == tokenizer.pad_token_id and i >= context_length else t
                  for i, t in enumerate(labels)]
    return input_ids, labels, context_length, pre_image, truncated


def encode_entry(entry, where: str, has_image: bool, *, tokenizer, image_length: int, max_source_length: int,
                 max_target_length: int, ignore_pad: bool = True, source_prefix: str = "", english: bool = False):
    """One sample per answer of a dataset entry, each with the turns before it as history:
    [(input_ids, labels, context_length, pre_image, truncated)]."""
    turns = entry_turns(entry, where)
    lang_english = entry.get("lang") == "en" if isinstance(entry.get("lang"), str) else english
    history, out = [], []
    for prompt, label in turns:
        text = build_prompt(source_prefix + prompt, history, english=lang_english, image=has_image)
        out.append(encode_sample(tokenizer, text, label, has_image, image_length, max_source_length,
                                 max_target_length, ignore_pad))
        history.append((prompt, label))
    return out


class VisualGLMDataset(torch.utils.data.Dataset):
    """Samples of one or more dataset files, tokenized up front (so that every malformed entry is
    reported before training starts); images are read when a sample is fetched."""

    def __init__(self, files: Sequence, tokenizer, image_size, image_length: int, max_source_length: int,
                 max_target_length: int, ignore_pad: bool = True, source_prefix: str = "",
                 english: bool = False, entries=None):
        self.image_size = image_size
        self.samples: List[Sample] = []
        self.truncated = 0
        head = len(tokenizer.encode("<img>", add_special_tokens=False))
        if max_source_length - 1 < head + image_length + 1:
            raise ValueError(f"--max_source_length {max_source_length} leaves no room for the {image_length} "
                             f"image tokens and a question; use at least {head + image_length + 8}.")
        if entries is None:
            entries = [(Path(f), where, e) for f in files for where, e in read_entries(Path(f))]
        encode = functools.partial(encode_entry, tokenizer=tokenizer, image_length=image_length,
                                   max_source_length=max_source_length, max_target_length=max_target_length,
                                   ignore_pad=ignore_pad, source_prefix=source_prefix, english=english)
        for dataset_file, where, entry in entries:
            image = resolve_image(entry.get("img") if isinstance(entry, dict) else None, Path(dataset_file), where)
            for ids, labels, ctx, pre, cut in encode(entry, where, image is not None):
                self.truncated += cut
                self.samples.append(Sample(ids, labels, ctx, pre, image, where))
        self._cache: Dict[Path, torch.Tensor] = {}

    def __len__(self):
        return len(self.samples)

    def image_tensor(self, sample: Sample) -> torch.Tensor:
        if sample.image in self._cache:
            return self._cache[sample.image]
        try:
            pixels = pixels_uint8(load_image(sample.image), self.image_size)  # [3, H, W] uint8
        except ImageLoadError as e:
            raise DataError(f"{sample.where}: {e}") from e
        if len(self._cache) < 256:  # few-shot sets: decode each image once
            self._cache[sample.image] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        return {"input_ids": s.input_ids, "labels": s.labels, "context_length": s.context_length,
                "pre_image": s.pre_image, "image": self.image_tensor(s) if s.image is not None else None}


class GeneratedDataset(torch.utils.data.Dataset):
    """`--train-data synthetic:<samples>[:<seed>]`: synthetic shape scenes and questions made on the fly
    by the loader workers (synthetic/stream.py), each sample a new image. A conversation contributes
    one of its answers (with the turns before it as history), chosen by the sample's index."""

    def __init__(self, spec: str, tokenizer, image_size, image_length: int, max_source_length: int,
                 max_target_length: int, ignore_pad: bool = True, source_prefix: str = "", english: bool = False):
        from synthetic.stream import parse_spec
        try:
            self.size, self.seed = parse_spec(spec)
        except ValueError as e:
            raise DataError(f"--train-data {e}") from None
        self.spec, self.image_size, self.truncated = spec, image_size, 0
        self.encode = functools.partial(encode_entry, tokenizer=tokenizer, image_length=image_length,
                                        max_source_length=max_source_length, max_target_length=max_target_length,
                                        ignore_pad=ignore_pad, source_prefix=source_prefix, english=english)

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        from synthetic.stream import generated_entry
        entry, image = generated_entry(index, self.seed)
        samples = self.encode(entry, f"{self.spec}[{index}]", True)
        ids, labels, ctx, pre, _ = samples[index % len(samples)]
        return {"input_ids": ids, "labels": labels, "context_length": ctx, "pre_image": pre,
                "image": pixels_uint8(image, self.image_size)}


def split_entries(entries: list, weights: str, seed: int):
    """Deterministically split entries into train / valid / test by weights like '9,1,0' (sat's --split)."""
    w = [float(x) for x in str(weights).replace(" ", "").split(",") if x != ""]
    w = (w + [0.0, 0.0, 0.0])[:3]
    if sum(w) <= 0:
        raise ValueError(f"--split {weights!r}: the weights must add up to more than 0")
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    bounds = np.cumsum(w) / sum(w) * len(entries)
    cuts = [int(round(b)) for b in bounds]
    parts = [order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:]]
    return [[entries[i] for i in sorted(p)] for p in parts]


def collate(rows: List[dict], pad_id: int) -> dict:
    """Right-pad to the longest row; positions and the GLM mask (spec 3.4/3.5) for each row."""
    from model.positions import glm_attention_mask, glm_positions
    total = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), total), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), total), IGNORE, dtype=torch.long)
    positions = torch.zeros(len(rows), 2, total, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        positions[b, :, :n] = glm_positions(r["context_length"], n)
    contexts = [r["context_length"] for r in rows]
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions,
             "attention_mask": glm_attention_mask(contexts, [0] * len(rows), total),
             "pre_image": torch.tensor([r["pre_image"] if r["image"] is not None else -1 for r in rows])}
    images = [r["image"] for r in rows]
    if any(i is not None for i in images):
        ref = next(i for i in images if i is not None)
        batch["image"] = torch.stack([i if i is not None else torch.zeros_like(ref) for i in images])
    return batch


class BatchOrder:
    """Reproducible endless order of a dataset, reshuffled each epoch (seed + epoch), cut into
    micro-batches for each data-parallel rank. Micro-batch `step` of a rank depends on nothing else,
    so resuming only needs the step number."""

    def __init__(self, size: int, batch_size: int, world: int, rank: int, seed: int, shuffle: bool = True):
        self.size, self.batch_size, self.world, self.rank = size, batch_size, world, rank
        self.seed, self.shuffle = seed, shuffle
        self._perms: Dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            self._perms = {epoch: np.random.RandomState(self.seed + epoch).permutation(self.size)}
        return int(self._perms[epoch][offset])

    def batch(self, step: int) -> List[int]:
        start = (step * self.world + self.rank) * self.batch_size
        return [self._index(start + i) for i in range(self.batch_size)]


class _Steps(torch.utils.data.Sampler):
    def __init__(self, order: BatchOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self):
        return (self.order.batch(s) for s in range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


def make_loader(dataset, order: BatchOrder, start: int, stop: int, pad_id: int, workers: int):
    # its own generator: creating the loader must not draw from the global RNG (dropout), so that a
    # resumed run continues the random stream it saved
    return torch.utils.data.DataLoader(dataset, batch_sampler=_Steps(order, start, stop), num_workers=workers,
                                       collate_fn=functools.partial(collate, pad_id=pad_id),
                                       generator=torch.Generator().manual_seed(order.seed + start),
                                       pin_memory=torch.cuda.is_available())


# ==============================================================================================
# loss, learning rate

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


# ==============================================================================================
# distributed setup, DeepSpeed

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(args) -> Dist:
    """torch.distributed before DeepSpeed and sat: NCCL on GPUs, gloo on the CPU. A single process
    without launcher variables gets a private TCP rendezvous."""
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank is not None else 0))
    os.environ["LOCAL_RANK"] = str(local_rank)     # DeepSpeed insists on it
    backend = args.distributed_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        log("warning: --distributed-backend nccl needs CUDA; using gloo on this CPU-only machine")
        backend = "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        from model.sat.compat import skip_deepspeed_shm_comm
        skip_deepspeed_shm_comm()
    if not torch.distributed.is_initialized():
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            init_method = "env://"
        elif world == 1:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            raise SystemExit("error: WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (use the deepspeed launcher)")
        torch.distributed.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world,
                                             timeout=datetime.timedelta(minutes=30))
    else:  # e.g. sat already made a one-process group in this interpreter
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from sat import mpu
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)  # wraps the group
    if cuda:
        # On CUDA, sat's attention dropout and activation checkpointing draw from DeepSpeed's model-parallel
        # RNG tracker, which sat seeds only when it creates the process group itself.
        deepspeed.checkpointing.configure(mpu, partition_activations=False)
        mpu.model_parallel_cuda_manual_seed(args.seed)
    return Dist(rank, world, local_rank, device)


def train_dtype(args, device) -> torch.dtype:
    if args.fp16 and device.type != "cuda":
        log("warning: --fp16 on a machine without CUDA: training in fp32 instead (use --bf16 for bfloat16)")
        args.fp16 = False
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def deepspeed_config(args, world: int) -> dict:
    config = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config, encoding="utf-8") as f:
            config = json.load(f)
    config.update({
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.batch_size * args.gradient_accumulation_steps * world,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    config.setdefault("gradient_clipping", args.gradient_clipping)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = args.zero_stage
    optimizer = config.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update({"lr": args.lr, "weight_decay": args.weight_decay})
    params.setdefault("betas", [0.9, 0.95])
    params.setdefault("eps", 1e-8)
    params.setdefault("torch_adam", True)   # no JIT build of fused Adam; adapters are small anyway
    params.setdefault("adam_w_mode", True)
    if args.fp16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 400, "hysteresis": 2,
                          "min_loss_scale": 1, "initial_scale_power": 16, **config.get("fp16", {})}
        config["fp16"]["enabled"] = True
    elif args.bf16:
        config["bf16"] = {**config.get("bf16", {}), "enabled": True}
    for key, other in (("fp16", args.fp16), ("bf16", args.bf16)):
        if key in config and not other:
            config[key]["enabled"] = False
    return config


def param_groups(module) -> List[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "bias" in name or "layernorm" in name else decay).append(p)
    groups = [{"params": decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ==============================================================================================
# model

ADAPTER_FLAGS = ("use_lora", "use_qlora", "use_ptuning")


@dataclass
class Source:
    """Where the weights come from: a checkpoint folder, a run to resume, or a config (random init)."""
    kind: str                    # "pretrained", "load" or "config"
    path: Path                   # the checkpoint / run folder, or the config file
    config: dict                 # its model_config.json
    adapters: dict               # adapter entries for the model to build (finetune mode)
    iteration: Optional[int] = None

    @property
    def folder(self) -> Path:
        return self.path.parent if self.kind == "config" else self.path


def resolve_source(args) -> Source:
    """Read the model config (not the weights) and decide which adapters to build."""
    from model.sat.checkpoint import read_config, resolve_checkpoint_dir
    from model.sat.finetune import ADAPTER_ARGS, adapter_config
    want = adapter_config(args) if args.mode == "finetune" else {}
    if args.load:
        run = resolve_checkpoint_dir(args.load, download=False)
        config = read_config(run)
        is_finetune = config.get("model_class") == "FineTuneVisualGLMModel"
        if (args.mode == "finetune") != is_finetune:
            raise SystemExit(f"error: --load {run} holds a {config.get('model_class')}; resume it with "
                             f"--mode {'finetune' if is_finetune else 'pretrain'}")
        adapters = {k: config[k] for k in ADAPTER_ARGS if k in config}
        done = complete_iterations(run)   # train() settles it with recover_run_folder before loading
        return Source("load", run, config, adapters, done[-1] if done else None)
    if args.from_config:
        path = Path(args.from_config)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: cannot read --from_config {path}: {e}")
        source = Source("config", path, config, want)
    else:
        folder = resolve_checkpoint_dir(args.from_pretrained)
        source = Source("pretrained", folder, read_config(folder), want)
    has = [k for k in ADAPTER_FLAGS if source.config.get(k)]
    if args.mode == "finetune" and not any(want.get(k) for k in ADAPTER_FLAGS) and has:
        source.adapters = {k: source.config[k] for k in ADAPTER_ARGS if k in source.config}
        log(f"note: continuing to train the adapters of {source.path} ({', '.join(has)})")
    if args.mode == "finetune" and not any(source.adapters.get(k) for k in ADAPTER_FLAGS):
        raise SystemExit("error: --mode finetune needs an adapter: --use_lora, --use_qlora or --use_ptuning "
                         "(or --mode pretrain to train every weight)")
    if args.mode == "pretrain" and has:
        raise SystemExit(f"error: {source.path} has adapters ({', '.join(has)}); fold LoRA into the weights first "
                         f"(python -m model.sat.merge_lora) to train all weights")
    return source


def load_for_training(args, source: Source, dist: Dist, dtype: torch.dtype):
    """The model to train, on its device (QLoRA: on the CPU; bitsandbytes quantizes when DeepSpeed
    moves it to the GPU), and the config to save with it."""
    from model.sat.checkpoint import build_args, load_model, model_class
    from model.sat.finetune import is_adapter_key
    qlora = bool(source.adapters.get("use_qlora")) and not source.adapters.get("use_lora")
    device = "cpu" if qlora else dist.device
    overwrite = dict(source.adapters, seed=args.seed,
                     model_class="FineTuneVisualGLMModel" if args.mode == "finetune" else "VisualGLMModel")
    if source.kind == "config":
        config = {**source.config, **overwrite}
        cls = model_class(config["model_class"])
        model_args = build_args(cls, config, skip_init=False)
        model = cls(model_args, params_dtype=torch.float32)   # sat's random init, seeded by args.seed
        model.args, model.config = model_args, config
        model = model.to(dtype=dtype)            # (QLoRA layers stay unquantized until moved to a device)
        if torch.device(device).type != "cpu":
            model = model.to(device)
    else:
        resuming = source.kind == "load"
        model = load_model(str(source.path), device=device, dtype=dtype, overwrite_config=overwrite,
                           allow_missing=is_adapter_key if args.mode == "finetune" and not resuming
                           else (lambda key: False))
    return model, {k: v for k, v in model.config.items() if k != "seed"}


def count_parameters(module):
    total = trainable = tensors = 0
    for p in module.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and getattr(p, "bnb_quantized", False) else 1)
        total += n
        if p.requires_grad:
            trainable += n
            tensors += 1
    return trainable, total, tensors


# ==============================================================================================
# checkpoints

TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")
LOG_FILE = "train_log.jsonl"
MODEL_FILE = "mp_rank_00_model_states.pt"
# A run folder only ever shows complete iterations: <run>/<n>/ is written as <run>/.saving-<n>/, gets a
# complete.json listing its files (written last), is synced and renamed into place, and only then does
# `latest` name it. An older folder of the same number is set aside as .replaced-<n> while it is replaced.
COMPLETE_MARKER = "complete.json"
SAVING_PREFIX = ".saving-"
REPLACED_PREFIX = ".replaced-"
OLD_STAGING_PREFIXES = (".staging-", "..staging-")   # what older versions of this script left on a crash


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_latest(run_dir: Path) -> Optional[int]:
    try:
        text = (run_dir / "latest").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_complete_marker(folder: Path, iteration: int) -> None:
    files = {f.relative_to(folder).as_posix(): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / COMPLETE_MARKER).write_text(json.dumps({"iteration": iteration, "files": files}, indent=1))


def is_complete(folder: Path) -> bool:
    """The folder has its complete.json and every file it lists, at the size it lists."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        return all((folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_iterations(run_dir: Path) -> List[int]:
    """Iterations of a run that are safe to load, oldest first. A folder without complete.json counts
    only when `latest` names it and it has its model file: older versions wrote `latest` last."""
    latest = read_latest(run_dir)
    found = []
    for folder in run_dir.iterdir() if run_dir.is_dir() else ():
        if folder.name.isdigit() and folder.is_dir():
            legacy = (int(folder.name) == latest and not (folder / COMPLETE_MARKER).exists()
                      and (folder / MODEL_FILE).is_file())
            if legacy or is_complete(folder):
                found.append(int(folder.name))
    return sorted(found)


def clean_leftovers(run_dir: Path) -> None:
    """Undo what an interrupted save left in a run folder (rank 0, before resuming): an iteration that
    was set aside and never replaced is put back; half-written folders and temporary files go."""
    for path in sorted(run_dir.iterdir()):
        name = path.name
        if name.startswith(REPLACED_PREFIX):
            target = run_dir / name[len(REPLACED_PREFIX):]
            if target.name.isdigit() and not target.exists() and is_complete(path):
                os.replace(path, target)
                log(f"restored {target}: a save replacing it was interrupted")
                continue
        if name.startswith((SAVING_PREFIX, REPLACED_PREFIX) + OLD_STAGING_PREFIXES) or \
                (name.startswith(".") and name.endswith(".tmp")):
            _remove(path)
            log(f"removed {path}: left by an interrupted save")


def recover_run_folder(run_dir: Path, dist: Dist) -> int:
    """Prepare a run folder for --load: clean leftovers, make `latest` name the newest complete
    iteration (so that load_model and the merge tools read the same one) and return it on every rank."""
    from model.sat.checkpoint import CheckpointError, atomic_write_text
    if dist.rank == 0:
        clean_leftovers(run_dir)
        done = complete_iterations(run_dir)
        for folder in sorted(run_dir.iterdir()):
            if folder.name.isdigit() and folder.is_dir() and int(folder.name) > (done[-1] if done else -1):
                log(f"ignoring {folder}: incomplete (its save was interrupted)")
        if done and read_latest(run_dir) != done[-1]:
            log(f"{run_dir / 'latest'} named {read_latest(run_dir)}; the newest complete iteration is {done[-1]}")
            atomic_write_text(run_dir / "latest", str(done[-1]))
    torch.distributed.barrier()
    done = complete_iterations(run_dir)
    if not done:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to resume from (was it killed before its "
                              f"first save finished?)")
    return done[-1]


def trim_train_log(run_dir: Path, iteration: int) -> None:
    """A resumed run repeats the iterations after its checkpoint: move their records, and a line cut
    short by a kill, to train_log.discarded.jsonl so that train_log.jsonl reads as one run."""
    from model.sat.checkpoint import atomic_write_text
    path = run_dir / LOG_FILE
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
            done = line.endswith("\n") and int(record.get("iteration", 0)) <= iteration
        except (ValueError, TypeError, AttributeError):
            done = False
        (keep if done else drop).append(line if line.endswith("\n") else line + "\n")
    if drop:
        with open(run_dir / "train_log.discarded.jsonl", "a", encoding="utf-8") as f:
            f.writelines(drop)
        atomic_write_text(path, "".join(keep))
        log(f"moved {len(drop)} record(s) of {LOG_FILE} after iteration {iteration} to train_log.discarded.jsonl")


def open_run_folder(run_dir: Path, tokenizer_dir: Path, resume_iteration: Optional[int]) -> None:
    """Rank 0: create the run folder with its tokenizer; when resuming, make it consistent first."""
    from model.sat.checkpoint import atomic_copy
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_iteration is not None:
        clean_leftovers(run_dir)
        trim_train_log(run_dir, resume_iteration)
    for f in TOKENIZER_FILES:   # copied under a temporary name: a kill must not leave a truncated tokenizer
        if (tokenizer_dir / f).is_file() and not (run_dir / f).exists():
            atomic_copy(tokenizer_dir / f, run_dir / f)
    log(f"run folder: {run_dir}")


def write_model_files(module, folder: Path) -> None:
    """<folder>/mp_rank_00_model_states.pt in sat format (weights-only loadable)."""
    from model.sat.checkpoint import write_model_state
    write_model_state(module, folder / MODEL_FILE)


def publish_iteration(run_dir: Path, staging: Path, iteration: int, config: dict) -> None:
    """Rank 0: turn a fully written staging folder into <run>/<iteration> and name it in `latest`."""
    from model.sat.checkpoint import atomic_write_text, fsync_path, fsync_tree
    write_complete_marker(staging, iteration)
    fsync_tree(staging)
    atomic_write_text(run_dir / "model_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    target, aside = run_dir / str(iteration), run_dir / f"{REPLACED_PREFIX}{iteration}"
    if target.exists():   # half-written by an older version, or saved by an earlier attempt of this run
        _remove(aside)
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_path(run_dir)
    atomic_write_text(run_dir / "latest", str(iteration))
    _remove(aside)


def previous_checkpoint(run_dir: Path) -> str:
    done = complete_iterations(run_dir)
    if not done:
        return "no earlier checkpoint of this run is complete"
    return f"the previous checkpoint {done[-1]} is intact ({run_dir / str(done[-1])})"


def _any_rank(failed: bool, device) -> bool:
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def save_iteration(engine, run_dir: Path, iteration: int, config: dict, dist: Dist, args, micro_step: int):
    """<run>/<iteration>/ with the model file and deepspeed/ (optimizer state, for --load), all or
    nothing: a kill at any moment leaves `latest` naming a complete iteration. Running out of disk
    raises CheckpointSaveError and leaves the previous checkpoint as it was."""
    from model.sat.checkpoint import save_error
    client = {"iteration": iteration, "micro_step": micro_step}
    if not args.no_save_rng:
        client["rng"] = rng_state()
    config = dict(config, model_class=type(engine.module).__name__)
    staging = run_dir / f"{SAVING_PREFIX}{iteration}"
    if dist.rank == 0:
        _remove(staging)   # from an earlier attempt at this iteration
    torch.distributed.barrier()
    failure = None
    try:   # every rank writes its optimizer partition; DeepSpeed's files stay out of the model file
        engine.save_checkpoint(str(staging), tag="deepspeed", client_state=client,
                               save_latest=False, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:   # RuntimeError: torch's zip writer reporting a failed write
        failure = e
    if not _any_rank(failure is not None, dist.device) and dist.rank == 0:
        try:
            write_model_files(engine.module, staging)
            publish_iteration(run_dir, staging, iteration, config)
        except (OSError, RuntimeError) as e:
            failure = e
    if _any_rank(failure is not None, dist.device):   # all ranks stop together instead of waiting forever
        if dist.rank == 0:
            _remove(staging)
        error = failure or RuntimeError("another process could not write its part")
        raise save_error(error, run_dir / str(iteration), previous_checkpoint(run_dir)) from failure
    log(f"saved iteration {iteration} to {run_dir}")


# ==============================================================================================
# training

@dataclass
class TrainResult:
    model: torch.nn.Module
    run_dir: Optional[Path]
    iteration: int
    losses: List[float] = field(default_factory=list)       # per iteration (mean over micro-batches)
    valid_losses: List[tuple] = field(default_factory=list)  # (iteration, loss)
    trainable: int = 0


def _all_mean(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


@torch.no_grad()
def evaluate(engine, dataset, args, dist: Dist, pad_id: int) -> float:
    order = BatchOrder(len(dataset), args.eval_batch_size, dist.world, dist.rank, args.seed, shuffle=False)
    steps = min(args.eval_iters, max(1, math.ceil(len(dataset) / (args.eval_batch_size * dist.world))))
    engine.eval()
    losses = [forward_loss(engine, batch, dist.device).item()
              for batch in make_loader(dataset, order, 0, steps, pad_id, 0)]
    engine.train()
    return _all_mean(sum(losses) / len(losses), dist.device)


def _fmt_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


def load_datasets(args, tokenizer, config: dict):
    """(train, valid or None, test or None) datasets; --split divides --train-data when no --valid-data."""
    options = dict(tokenizer=tokenizer, image_size=tuple(config["eva_args"]["image_size"]),
                   image_length=config["image_length"], max_source_length=args.max_source_length,
                   max_target_length=args.max_target_length, ignore_pad=args.ignore_pad_token_for_loss,
                   source_prefix=args.source_prefix, english=args.english)
    # synthetic:<samples>[:<seed>] sources are generated on the fly and only ever train; --split divides files
    from synthetic.stream import SPEC_PREFIX
    generated = [GeneratedDataset(f, **options) for f in args.train_data if f.startswith(SPEC_PREFIX)]
    files = [f for f in args.train_data if not f.startswith(SPEC_PREFIX)]
    entries = [(Path(f), where, e) for f in files for where, e in read_entries(Path(f))]
    if args.valid_data is not None or not entries:
        parts = (entries, [], [])
    else:
        parts = split_entries(entries, args.split, args.seed)
        if not parts[0] and not generated:
            raise DataError(f"--split {args.split} leaves no training entries")
    sets = [VisualGLMDataset(None, entries=part, **options) if part else None for part in parts]
    if sets[0] is not None and sets[0].truncated:
        log(f"warning: {sets[0].truncated} of {len(sets[0])} training samples were cut to "
            f"--max_source_length {args.max_source_length} / --max_target_length {args.max_target_length}")
    if generated:
        sets[0] = torch.utils.data.ConcatDataset(([sets[0]] if sets[0] is not None else []) + generated)
    if args.valid_data:
        sets[1] = VisualGLMDataset(args.valid_data, **options)
    if args.test_data:
        sets[2] = VisualGLMDataset(args.test_data, **options)
    return tuple(sets)


def train(args) -> TrainResult:
    import deepspeed
    from model.sat.loading import load_tokenizer

    dist = setup_distributed(args)
    dtype = train_dtype(args, dist.device)
    set_seed(args.seed)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    # config, tokenizer and data first: a bad dataset fails in seconds, before a 6B model loads
    from model.sat.loading import find_tokenizer_dir
    source = resolve_source(args)
    tokenizer_dir = find_tokenizer_dir(source.folder, source.config.get("tokenizer_type"), args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > source.config["vocab_size"]:
        raise SystemExit(f"error: the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                         f"{source.config['vocab_size']}; they do not belong together (pass --tokenizer)")
    if source.kind == "load":
        source.iteration = recover_run_folder(source.path, dist)
    train_set, valid_set, test_set = load_datasets(args, tokenizer, source.config)
    global_batch = args.batch_size * args.gradient_accumulation_steps * dist.world
    if args.train_iters is None:
        args.train_iters = math.ceil(args.epochs * len(train_set) / global_batch) if args.epochs else 10000
    log(f"data: {len(train_set)} training samples"
        + (f", {len(valid_set)} validation" if valid_set else "") + (f", {len(test_set)} test" if test_set else "")
        + f"; {args.train_iters} iterations of {global_batch} samples "
        f"({args.batch_size} x {args.gradient_accumulation_steps} accumulation x {dist.world} processes)")

    log(f"loading {source.path} ({'random init, ' if source.kind == 'config' else ''}{str(dtype)[6:]} on "
        f"{'cpu, quantized on the way to ' + str(dist.device) if source.adapters.get('use_qlora') and not source.adapters.get('use_lora') else dist.device})")
    model, config = load_for_training(args, source, dist, dtype)
    config.setdefault("pad_token_id", tokenizer.pad_token_id)  # marks the [Q|K|V] layout (spec 1.3)

    # model, optimizer
    if args.mode == "finetune":
        model.disable_untrainable_params()
    else:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    trainable, total, tensors = count_parameters(model)
    if trainable == 0:
        raise SystemExit("error: no parameter is trainable")
    log(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.3f}%) in {tensors} tensors "
        f"[{args.mode}; {', '.join(k for k in ('use_lora', 'use_qlora', 'use_ptuning') if config.get(k)) or 'all weights'}]")
    if args.checkpoint_activations:  # (sat uses DeepSpeed's checkpointing on CUDA, torch's on the CPU)
        model.transformer.checkpoint_activations = True
        model.transformer.checkpoint_num_layers = args.checkpoint_num_layers
    model.train()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                                   config=deepspeed_config(args, dist.world))

    # run folder
    iteration, micro_step = 0, 0
    run_dir = None
    set_seed(args.seed + dist.rank)   # dropout; a resumed run restores the saved state below
    if args.load:  # sat: runs resume in their own folder (under --save when given)
        run_dir = Path(args.save) / source.path.resolve().name if args.save else source.path
        iteration = source.iteration
        ds_dir = source.path / str(source.iteration)
        if (ds_dir / "deepspeed").is_dir():
            _, client = engine.load_checkpoint(str(ds_dir), tag="deepspeed", load_module_strict=False,
                                               load_lr_scheduler_states=False)
            client = client or {}
            iteration = int(client.get("iteration", iteration))
            if args.resume_dataloader:
                micro_step = int(client.get("micro_step", 0))
            if "rng" in client and not args.no_load_rng:
                set_rng_state(client["rng"])
        else:
            log(f"warning: {ds_dir} has no deepspeed/ optimizer state; the optimizer starts fresh")
        log(f"resuming {source.path} at iteration {iteration}")
    elif args.save:
        run_dir = None
        if dist.rank == 0:
            stamp = datetime.datetime.now().strftime("%m-%d-%H-%M")
            run_dir = base = Path(args.save) / f"{args.experiment_name}-{stamp}"
            n = 1
            while run_dir.exists() and any(run_dir.iterdir()):  # two runs started in the same minute
                run_dir, n = Path(f"{base}-{n}"), n + 1
        names = [str(run_dir)]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    if run_dir is not None and dist.rank == 0:
        open_run_folder(run_dir, tokenizer_dir, iteration if args.load else None)
    result = TrainResult(model=engine.module, run_dir=run_dir, iteration=iteration, trainable=trainable)
    stop = min(args.train_iters, args.exit_interval or args.train_iters)
    if iteration >= stop:   # saving now would only rewrite the checkpoint just loaded
        limit = "--train-iters" if stop == args.train_iters else "--exit-interval"
        log(f"nothing to do: iteration {iteration} >= {limit} {stop}")
        return result

    order = BatchOrder(len(train_set), args.batch_size, dist.world, dist.rank, args.seed)
    accumulation = args.gradient_accumulation_steps
    loader = iter(make_loader(train_set, order, micro_step, micro_step + (stop - iteration) * accumulation,
                              tokenizer.pad_token_id, args.num_workers))
    log_file = open(run_dir / LOG_FILE, "a", encoding="utf-8") if run_dir is not None and dist.rank == 0 else None
    start_time = time.time()
    start_iteration = iteration
    window_losses, window_start, window_iters = [], time.time(), 0
    try:
        while iteration < stop:
            lr = learning_rate(args, iteration)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            step_losses = []
            for _ in range(accumulation):
                batch = next(loader)
                loss = forward_loss(engine, batch, dist.device)
                engine.backward(loss)
                engine.step()
                step_losses.append(loss.item())
                micro_step += 1
            iteration += 1
            result.losses.append(sum(step_losses) / len(step_losses))
            window_losses.append(result.losses[-1])
            window_iters += 1
            if iteration % args.log_interval == 0 or iteration == stop:
                mean_loss = _all_mean(sum(window_losses) / len(window_losses), dist.device)
                elapsed = time.time() - window_start
                per_iter = (time.time() - start_time) / (iteration - start_iteration)
                record = {"iteration": iteration, "loss": mean_loss, "lr": lr,
                          "samples_per_s": window_iters * global_batch / max(elapsed, 1e-9),
                          "elapsed_s": time.time() - start_time, "eta_s": per_iter * (stop - iteration)}
                memory = ""
                if args.fp16:
                    record["skipped_steps"] = int(getattr(engine, "skipped_steps", 0))
                if dist.device.type == "cuda":
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2 ** 30
                    memory = f" | max memory {record['max_memory_gib']:.1f} GiB"
                log(f"iteration {iteration:>6}/{args.train_iters} | loss {mean_loss:.4f} | lr {lr:.3e} | "
                    f"{record['samples_per_s']:.2f} samples/s | elapsed {_fmt_time(record['elapsed_s'])} | "
                    f"ETA {_fmt_time(record['eta_s'])}{memory}")
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                window_losses, window_start, window_iters = [], time.time(), 0
            if valid_set is not None and args.eval_interval and iteration % args.eval_interval == 0:
                valid = evaluate(engine, valid_set, args, dist, tokenizer.pad_token_id)
                result.valid_losses.append((iteration, valid))
                log(f"validation loss at iteration {iteration}: {valid:.4f} (perplexity {math.exp(min(valid, 50)):.2f})")
                if log_file:
                    log_file.write(json.dumps({"iteration": iteration, "valid_loss": valid}) + "\n")
                    log_file.flush()
            if run_dir is not None and iteration % args.save_interval == 0 and iteration != stop:
                save_iteration(engine, run_dir, iteration, config, dist, args, micro_step)
        if run_dir is not None:
            save_iteration(engine, run_dir, iteration, config, dist, args, micro_step)
        if valid_set is not None and not (args.eval_interval and iteration % args.eval_interval == 0):
            valid = evaluate(engine, valid_set, args, dist, tokenizer.pad_token_id)
            result.valid_losses.append((iteration, valid))
            log(f"validation loss at the end (iteration {iteration}): {valid:.4f}")
        if test_set is not None:
            log(f"test loss at the end: {evaluate(engine, test_set, args, dist, tokenizer.pad_token_id):.4f}")
    finally:
        if log_file:
            log_file.close()
    result.iteration = iteration
    result.model = engine.module
    return result


def run(argv=None) -> TrainResult:
    return train(parse_args(argv))


def main(argv=None) -> int:
    from model.sat.checkpoint import CheckpointError
    try:
        run(argv)
    except (DataError, CheckpointError, ImageLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
