"""Sampling and the cached decoding loop shared by every front end.

Sampling follows sat's BaseStrategy (spec 7.1):
  1. NaN logits are an error; +inf logits leave only those tokens in play;
  2. logits / temperature, and ids already *generated* (not the prompt) are further divided by
     repetition_penalty (sign-agnostic division, as sat does);
  3. invalid_slices are masked out;
  4. top_k > 0: keep the k best, then nucleus filtering with top_p (top_k = 0 disables both);
  5. softmax -> multinomial.
Greedy (argmax) when top_k == 1 or temperature == 0.

Every accepted setting is numerically safe: the divisor is kept within [1e-30, 1e30] and scaled logits
within fp32's finite range, and masked tokens get -inf rather than sat's -65504 (a tiny temperature or
penalty can push kept logits far below -65504). So softmax never sees inf - inf and never gives NaN.

The decoding loop runs one forward over the whole (left-padded) batch of prompts, then one token per
step against sat's ChatGLM key/value cache (`past_key_values`), so nothing is recomputed.
"""
import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch

from .positions import batch_inputs, next_positions

MIN_TEMPERATURE = 1e-5         # below this a temperature acts as this (0 itself means greedy)
MIN_DIVISOR, MAX_DIVISOR = 1e-30, 1e30   # |fp16 logit| / 1e-30 stays well inside fp32
FP32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingParams:
    max_length: int = 1024             # prompt + answer tokens, as in the original chat()
    top_p: float = 0.7
    top_k: int = 30
    temperature: float = 0.95
    repetition_penalty: float = 1.2
    invalid_slices: Sequence[slice] = field(default_factory=list)
    max_new_tokens: Optional[int] = None

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (0 <= self.top_p <= 1):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0 or (self.top_k > 0 and self.top_p == 0)


def process_logits(logits: torch.Tensor, generated: List[int], p: SamplingParams) -> torch.Tensor:
    """logits [V] -> filtered logits [V] (fp32), steps 1-4 above. Removed tokens are -inf; at least one
    token is always left finite (ValueError otherwise)."""
    logits = logits.float()
    if torch.isnan(logits).any():
        raise ValueError("NaN in the model's logits (fp16 overflow? try --quant none or fp32/bf16).")
    certain = logits == float("inf")
    if certain.any():                     # infinitely likely: nothing else can be drawn
        logits = torch.zeros_like(logits).masked_fill(~certain, float("-inf"))
    # The two divisors are computed in Python floats and clamped, so that temperature * penalty can
    # neither underflow to 0 nor overflow to inf in fp32 (logits / 0 gave inf and NaN).
    plain = min(max(p.temperature, MIN_TEMPERATURE), MAX_DIVISOR)
    divisor = torch.full_like(logits, plain)
    if generated and p.repetition_penalty != 1.0:
        penalised = min(max(plain * p.repetition_penalty, MIN_DIVISOR), MAX_DIVISOR)
        divisor[torch.tensor(sorted(set(generated)), device=logits.device)] = penalised
    scaled = (logits / divisor).clamp(-FP32_MAX, FP32_MAX)
    logits = torch.where(torch.isinf(logits), logits, scaled)    # -inf stays impossible
    for s in p.invalid_slices:
        logits[s] = float("-inf")
    if p.top_k > 0:
        k = min(p.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            remove = cumulative > p.top_p
            remove[1:] = remove[:-1].clone()  # keep the token that crosses top_p
            remove[0] = False
            logits[order[remove]] = float("-inf")
    if not torch.isfinite(logits.max()):
        raise ValueError("No token can be sampled: every logit is -inf or masked by invalid_slices.")
    return logits


def sample(logits: torch.Tensor, generated: List[int], p: SamplingParams, generator=None) -> int:
    filtered = process_logits(logits, generated, p)
    if p.greedy:
        return int(filtered.argmax())
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class Request:
    """One prompt to continue. image_embeds [L, hidden] spliced at `pre_image` (its index in `ids`)."""
    ids: List[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    image_embeds: Optional[torch.Tensor] = None
    pre_image: int = -1
    generator: Optional[torch.Generator] = None
    error: Optional[Exception] = None    # why the row ended early, with generate(isolate_errors=True)


def _forward(model, **kw):
    out = model(**kw)
    return out[0][:, -1].float(), tuple(layer["past_key_values"] for layer in out[1:])


@torch.inference_mode()
def generate(model, requests: Sequence[Request], pad_id: int, eos_ids: Sequence[int], *,
             isolate_errors: bool = False) -> Iterator[List[Optional[int]]]:
    """Yield, per decoding step, the new token of every request (None once a request has finished).
    A request finishes on an eos id (not yielded), at max_length total tokens or at max_new_tokens.

    isolate_errors: when sampling a row raises, that row alone finishes, with the exception in its
    `request.error`, and the other rows go on (a server batching strangers' requests wants this).
    Otherwise the exception propagates. A failing forward pass always propagates: it is every row's."""
    for r in requests:
        r.error = None
    device = next(model.parameters()).device
    dtype = model.transformer.word_embeddings.weight.dtype
    ids, positions, mask, pads = batch_inputs([r.ids for r in requests], pad_id, device=device, dtype=dtype)
    kw = {}
    if any(r.image_embeds is not None for r in requests):
        ref = next(r.image_embeds for r in requests if r.image_embeds is not None)
        kw["image_embeds"] = torch.stack([(r.image_embeds if r.image_embeds is not None else torch.zeros_like(ref))
                                          .to(device) for r in requests])
        kw["pre_image"] = torch.tensor([pad + r.pre_image if r.image_embeds is not None else -1
                                        for r, pad in zip(requests, pads)], device=device)
    logits, cache = _forward(model, input_ids=ids, position_ids=positions, attention_mask=mask, **kw)

    batch = len(requests)
    generated: List[List[int]] = [[] for _ in requests]
    done = [len(r.ids) >= r.params.max_length for r in requests]
    key_mask = (torch.arange(ids.shape[1], device=device)[None] >= torch.tensor(pads, device=device)[:, None])
    positions = positions[:, :, -1:]
    while not all(done):
        step: List[Optional[int]] = []
        for b, r in enumerate(requests):
            if done[b]:
                step.append(None)
                continue
            try:
                token = sample(logits[b], generated[b], r.params, r.generator)
            except Exception as e:  # noqa: BLE001 - one row's failure is that row's alone
                if not isolate_errors:
                    raise
                r.error = e
                done[b] = True
                step.append(None)
                continue
            if token in eos_ids:
                done[b] = True
                step.append(None)
                continue
            generated[b].append(token)
            step.append(token)
            limit_new = r.params.max_new_tokens is not None and len(generated[b]) >= r.params.max_new_tokens
            if len(r.ids) + len(generated[b]) >= r.params.max_length or limit_new:
                done[b] = True
        if any(t is not None for t in step):
            yield step
        if all(done):
            break
        tokens = torch.tensor([[t if t is not None else pad_id] for t in step], device=device)   # [B, 1]
        positions = next_positions(positions)                                                    # [B, 2, 1]
        key_mask = torch.cat([key_mask, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        step_mask = key_mask[:, None, None, :].to(dtype)                                          # [B, 1, 1, T]
        logits, cache = _forward(model, input_ids=tokens, position_ids=positions, attention_mask=step_mask,
                                 past_key_values=cache)
