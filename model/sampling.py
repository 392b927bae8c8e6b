"""Sampling: how one next token is chosen from a row's logits.

It follows sat's BaseStrategy (spec 7.1):
  1. NaN logits are an error; +inf logits leave only those tokens in play (checked on the scaled
     logits that steps 2-3 leave: a masked one is out, one that overflowed its division is in);
  2. logits / temperature, and ids already *generated* (not the prompt) are further divided by
     repetition_penalty (sign-agnostic division, as sat does);
  3. invalid_slices are masked out;
  4. top_k > 0: keep the k best, then nucleus filtering with top_p (top_k = 0 disables both);
  5. softmax -> multinomial.
Greedy (argmax) when top_k == 1 or temperature == 0.

Every accepted setting is numerically safe: the divisor is kept within [1e-30, 1e30], and masked tokens
get -inf rather than sat's -65504 (a tiny temperature or penalty can push kept logits far below -65504).
So softmax never sees inf - inf and never gives NaN.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .defaults import CHAT_SAMPLING
from .transfer import PinnedRing

MIN_TEMPERATURE = 1e-5         # below this a temperature acts as this (0 itself means greedy)
MIN_DIVISOR, MAX_DIVISOR = 1e-30, 1e30   # |fp16 logit| / 1e-30 stays well inside fp32


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


@dataclass
class RowSettings:
    """The sampling settings of a batch's rows as tensors [B] on the logits' device, built once per
    generate() call, so that a decoding step filters and samples every row with a few batched kernels."""
    plain: torch.Tensor          # divisor of every logit: the temperature, clamped
    penalised: torch.Tensor      # divisor of already generated tokens: temperature x penalty, clamped
    top_k: torch.Tensor          # 0: neither top-k nor top-p
    top_p: torch.Tensor
    greedy: torch.Tensor         # bool
    ranks: int                   # how many of the best logits a step must rank: max top_k, or V if a row has none
    penalises: bool              # a row's generated tokens get another divisor (repetition_penalty != 1)
    invalid: Optional[torch.Tensor] = None   # [B, V] bool: invalid_slices, or None when no row has any

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int, device,
           ring: Optional[PinnedRing] = None) -> "RowSettings":
        """ring: copy through its page-locked buffers, so a loop running ahead does not wait here."""
        # Divisors are clamped in Python floats, so temperature x penalty can neither underflow to 0
        # nor overflow to inf in fp32 (logits / 0 gave inf and NaN).
        plain = [min(max(p.temperature, MIN_TEMPERATURE), MAX_DIVISOR) for p in params]
        penalised = [min(max(t * p.repetition_penalty, MIN_DIVISOR), MAX_DIVISOR) for t, p in zip(plain, params)]
        invalid = None
        if any(p.invalid_slices for p in params):
            invalid = torch.zeros(len(params), vocab, dtype=torch.bool)
            for b, p in enumerate(params):
                for sl in p.invalid_slices:
                    invalid[b, sl] = True
            invalid = invalid.to(device)
        ranks = vocab if any(p.top_k == 0 for p in params) else min(vocab, max(p.top_k for p in params))
        # one copy: float64 holds every value exactly (top_k < 2^53), each row rounds to fp32 as before
        table = [plain, penalised, [p.top_k for p in params], [p.top_p for p in params], [p.greedy for p in params]]
        t = ring.to_device(table, torch.float64, device) if ring is not None else \
            torch.tensor(table, dtype=torch.float64).to(device)                                  # [5, B]
        return cls(t[0].float(), t[1].float(), t[2].long(), t[3].float(), t[4].bool(), ranks, penalised != plain,
                   invalid)


@dataclass
class Ranked:
    """A step's candidates: each row's best `RowSettings.ranks` logits after steps 1-4, best first."""
    values: torch.Tensor         # [B, R] fp32, descending; removed ones -inf
    tokens: torch.Tensor         # [B, R] their token ids
    nan: torch.Tensor            # [B] bool: NaN in the row's logits
    empty: torch.Tensor          # [B] bool: nothing left to sample


def candidates(logits: torch.Tensor, seen: torch.Tensor, rows: RowSettings):
    """Steps 2-3 and the ranking of step 4: logits [B, V], seen [B, V] bool (tokens each row generated)
    -> (values [B, R] fp32, descending, tokens [B, R]): each row's best `rows.ranks` logits, divided by
    their divisors only when the penalty changes the order (otherwise a row's one positive divisor keeps
    it, and filter_ranked divides R values, not V). NaN ranks above everything (torch.topk and torch.sort
    both put it first), so a row with a NaN logit has NaN first."""
    x = logits.float()
    if rows.penalises:                                          # generated tokens are divided by more
        x = x / torch.where(seen, rows.penalised[:, None], rows.plain[:, None])
    if rows.invalid is not None:
        x = x.masked_fill(rows.invalid, float("-inf"))
    if rows.ranks < x.shape[-1]:
        return torch.topk(x, rows.ranks, dim=-1)                                   # [B, R], descending
    return torch.sort(x, dim=-1, descending=True)                                  # [B, V]


def filter_ranked(values: torch.Tensor, tokens: torch.Tensor, rows: RowSettings) -> Ranked:
    """candidates() -> Ranked: steps 1 and 4 on the R ranked values of each row."""
    if not rows.penalises:
        values = values / rows.plain[:, None]
    nan = torch.isnan(values[:, 0])
    # +inf tokens (ranked first; a logit that overflowed its division counts as one) are all that stay
    # in play, equally likely: softmax never sees inf - inf
    certain = values[:, :1] == float("inf")
    values = torch.where(certain, torch.where(values == float("inf"), 0.0, float("-inf")), values)
    use_k = (rows.top_k > 0)[:, None]
    kth = values.gather(1, (rows.top_k.clamp(1, values.shape[-1]) - 1)[:, None])   # [B, 1]
    values = torch.where(use_k & (values < kth), float("-inf"), values)
    beyond_p = torch.softmax(values, dim=-1).cumsum(-1) > rows.top_p[:, None]
    beyond_p = torch.cat([torch.zeros_like(beyond_p[:, :1]), beyond_p[:, :-1]], dim=1)  # keep the one crossing top_p
    values = torch.where(use_k & (rows.top_p < 1.0)[:, None] & beyond_p, float("-inf"), values)
    return Ranked(values, tokens, nan, ~torch.isfinite(values[:, 0]))


def rank_logits(logits: torch.Tensor, seen: torch.Tensor, rows: RowSettings) -> Ranked:
    """logits [B, V], seen [B, V] bool -> Ranked: steps 1-4 above for every row at once, with no host
    synchronisation. Only what changes the order (the repetition penalty, invalid slices) touches all V
    logits (130,528 for VisualGLM-6B); the rest works on the R ranked ones, so a step launches a few small
    kernels, not dozens over the whole vocabulary."""
    return filter_ranked(*candidates(logits, seen, rows), rows)


def filter_logits(logits: torch.Tensor, seen: torch.Tensor, rows: RowSettings):
    """rank_logits over the whole vocabulary: (filtered fp32 logits [B, V] with removed tokens -inf,
    nan [B], empty [B])."""
    ranked = rank_logits(logits, seen, rows)
    filtered = torch.full_like(logits, float("-inf"), dtype=torch.float32).scatter_(1, ranked.tokens, ranked.values)
    return filtered, ranked.nan, ranked.empty


def uniforms(generators: Sequence[Optional[torch.Generator]], device,
             ring: Optional[PinnedRing] = None) -> torch.Tensor:
    """One uniform number per row [B] on `device`: from the row's own generator when it has one, so a seed
    gives the same answer on any device (ring: their copy to the device does not wait for the GPU),
    otherwise all from the device's generator."""
    if any(g is not None for g in generators):
        u = [torch.rand((), generator=g).item() for g in generators]
        return ring.to_device(u, torch.float32, device) if ring is not None else torch.tensor(u).to(device)
    return torch.rand(len(generators), device=device)


def pick(ranked: Ranked, rows: RowSettings, u: torch.Tensor) -> torch.Tensor:
    """Ranked candidates and uniforms u [B] -> tokens [B]: for greedy rows the best (the lowest id among
    equal best, as argmax over the row), otherwise a draw from the softmax by inverse CDF, in vocabulary
    order: the first token whose cumulative probability reaches (1 - u) x the total."""
    values = ranked.values
    ids, order = ranked.tokens.sort(dim=-1)                                   # [B, R] vocabulary order
    cdf = torch.softmax(values, dim=-1).gather(1, order).cumsum(-1)
    target = ((1.0 - u) * cdf[:, -1])[:, None]                       # in (0, total]: zero-probability
    at = torch.searchsorted(cdf, target).clamp_(max=values.shape[-1] - 1)    # tokens never win
    drawn = ids.gather(1, at).squeeze(1)
    best = values == values[:, :1]
    best[:, 0] = True                                  # a NaN row's first (flagged; never an id out of range)
    best = torch.where(best, ranked.tokens, torch.iinfo(torch.long).max).amin(-1)
    return torch.where(rows.greedy, best, drawn)


def draw(ranked: Ranked, rows: RowSettings, generators: Sequence[Optional[torch.Generator]],
         ring: Optional[PinnedRing] = None) -> torch.Tensor:
    """pick() with a uniform number per row from uniforms()."""
    return pick(ranked, rows, uniforms(generators, ranked.values.device, ring))


class StepSampler:
    """One decoding step's sampling for a batch, as generate() runs it: logits [B, V] -> (tokens [B],
    [3, B] long: tokens, NaN flags, nothing-to-sample flags, for one copy to the host), remembering each
    row's tokens for the repetition penalty. Backends may hand generate() a faster one of the same
    behaviour (Backend.step_sampler: the fast path replays it as a CUDA graph)."""

    def __init__(self, rows: RowSettings, batch: int, vocab: int, device, generators, ring=None):
        self.rows, self.generators, self.ring = rows, list(generators), ring
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)   # generated tokens per row

    def __call__(self, logits: torch.Tensor):
        ranked = rank_logits(logits, self.seen, self.rows)
        tokens = draw(ranked, self.rows, self.generators, self.ring)                              # [B]
        self.seen.scatter_(1, tokens[:, None], True)              # finished rows' marks are never read
        return tokens, torch.stack([tokens, ranked.nan.long(), ranked.empty.long()])


NAN_ERROR = "NaN in the model's logits (fp16 overflow? try --quant none or fp32/bf16)."
EMPTY_ERROR = "No token can be sampled: every logit is -inf or masked by invalid_slices."


def process_logits(logits: torch.Tensor, generated: List[int], p: SamplingParams) -> torch.Tensor:
    """One row: logits [V] -> filtered logits [V] (fp32), steps 1-4 above. Removed tokens are -inf; at
    least one token is always left finite (ValueError otherwise)."""
    rows = RowSettings.of([p], logits.shape[-1], logits.device)
    filtered, nan, empty = filter_logits(logits[None], _seen_of(logits, generated), rows)
    _check(nan, empty)
    return filtered[0]


def sample(logits: torch.Tensor, generated: List[int], p: SamplingParams, generator=None) -> int:
    """One row: logits [V] -> the next token."""
    rows = RowSettings.of([p], logits.shape[-1], logits.device)
    ranked = rank_logits(logits[None], _seen_of(logits, generated), rows)
    _check(ranked.nan, ranked.empty)
    return int(draw(ranked, rows, [generator])[0])


def _seen_of(logits: torch.Tensor, generated: List[int]) -> torch.Tensor:
    seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
    if generated:
        seen[0, torch.tensor(sorted(set(generated)), device=logits.device)] = True
    return seen


def _check(nan: torch.Tensor, empty: torch.Tensor) -> None:
    if nan.item():
        raise ValueError(NAN_ERROR)
    if empty.item():
        raise ValueError(EMPTY_ERROR)
