"""Sampling: how one next token is chosen from a row's logits.

It follows sat's BaseStrategy (spec 7.1):
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
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .defaults import CHAT_SAMPLING

MIN_TEMPERATURE = 1e-5         # below this a temperature acts as this (0 itself means greedy)
MIN_DIVISOR, MAX_DIVISOR = 1e-30, 1e30   # |fp16 logit| / 1e-30 stays well inside fp32
FP32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingParams:
    max_length: int = CHAT_SAMPLING["max_length"]          # prompt + answer tokens
    top_p: float = CHAT_SAMPLING["top_p"]
    top_k: int = CHAT_SAMPLING["top_k"]
    temperature: float = CHAT_SAMPLING["temperature"]
    repetition_penalty: float = CHAT_SAMPLING["repetition_penalty"]
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
