"""A decoding step's sampling after the ranking, in one Triton kernel: model/sampling.py's filter_ranked
(temperature, +inf and NaN rows, top-k, top-p) and pick (greedy or the inverse-CDF draw in vocabulary
order), plus the record of the drawn token for the repetition penalty.

Why: in torch those are ~35 small kernels over a row's 100 ranked values. Replayed in the sampling graph
they took ~70 us of a token on an H200, and the sort by id ~14 us more (a radix sort for 100 numbers),
next to ~1.4 ms of weights read by an int4 token (torch.profiler, docs/benchmarks.md).

How: one program per row holds the row's R candidates (R <= MAX_RANKS) in registers. Top-p keeps the
first n + 1 candidates, n the count of cumulative probabilities <= top_p (the cumulative sums of
non-negative numbers never decrease, so this is filter_ranked's shifted comparison). The draw sorts
(id, probability bits) pairs packed in int64 (ids are distinct, so the order is the ids'), sums the
probabilities in that order and counts the sums below the target, as torch.searchsorted does.

    values [B, R] fp32 descending and tokens [B, R] (model/sampling.py candidates), RowSettings, u [B]
    fp32 uniforms, seen [B, V] bool (set at each row's token) -> [3, B] long: tokens, NaN flags, nothing-
    to-sample flags (StepSampler's output)

The float sums run in another order than torch's, so a draw whose uniform lands within rounding of a
boundary between two tokens may pick the other one; greedy picks and every flag are exact.
Like kernels.py, nothing imports Triton at load time.
"""
import torch

from .kernels import AVAILABLE

MAX_RANKS = 1024          # candidates one program holds (top_k up to this; top_k 0 ranks the whole row)

_built = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(values_ptr, tokens_ptr, plain_ptr, top_k_ptr, top_p_ptr, greedy_ptr, u_ptr, seen_ptr, out_ptr,
               B, R, V, svb, stb, ssb, DIVIDE: tl.constexpr, BLOCK: tl.constexpr, PAD: tl.constexpr = 0x7FFFFFFF):
        b = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        real = i < R
        v = tl.load(values_ptr + b * svb + i, mask=real, other=float("-inf"))                    # [BLOCK]
        ids = tl.load(tokens_ptr + b * stb + i, mask=real, other=0).to(tl.int64)
        if DIVIDE:                                   # no penalty: the row's one divisor, after the ranking
            v = tl.math.div_rn(v, tl.load(plain_ptr + b))        # rounded as torch divides
        first = tl.sum(tl.where(i == 0, v, 0.0))
        nan = first != first
        v = tl.where(first == float("inf"), tl.where(v == float("inf"), 0.0, float("-inf")), v)
        # top-k: the k-th best value and all equal to it stay
        k = tl.load(top_k_ptr + b)
        use_k = k > 0
        kth = tl.sum(tl.where(i == tl.minimum(tl.maximum(k, 1), R) - 1, v, 0.0))
        v = tl.where(use_k & (v < kth), float("-inf"), v)
        # top-p over the survivors, in ranked order
        p = tl.exp(v - tl.max(v, 0))
        p = p / tl.sum(p, 0)
        n = tl.sum((real & (tl.cumsum(p, 0) <= tl.load(top_p_ptr + b))).to(tl.int32), 0)
        v = tl.where(use_k & (tl.load(top_p_ptr + b) < 1.0) & (i > n), float("-inf"), v)
        first = tl.sum(tl.where(i == 0, v, 0.0))
        empty = (first != first) | (first == float("-inf"))
        # the draw: probabilities in id order (ids in the high half, padding last), the first whose
        # cumulative sum reaches (1 - u) x the total
        q = tl.exp(v - tl.max(v, 0))
        q = q / tl.sum(q, 0)
        bits = q.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.sort(tl.where(real, ids, PAD) * 4294967296 + bits, 0)
        cdf = tl.cumsum((key & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), 0)
        target = (1.0 - tl.load(u_ptr + b)) * tl.max(cdf, 0)
        at = tl.minimum(tl.sum((real & (cdf < target)).to(tl.int32), 0), R - 1)
        drawn = tl.sum(tl.where(i == at, key >> 32, 0), 0)
        best = tl.min(tl.where(real & ((v == first) | (i == 0)), ids, PAD), 0)     # a NaN row: its first
        token = tl.where(tl.load(greedy_ptr + b) != 0, best, drawn)
        tl.store(out_ptr + b, token)
        tl.store(out_ptr + B + b, nan.to(tl.int64))
        tl.store(out_ptr + 2 * B + b, empty.to(tl.int64))
        tl.store(seen_ptr + b * ssb + token, 1, mask=(token >= 0) & (token < V))     # (always, unless broken)

    return triton, kernel


def fits(ranks: int, on_gpu: bool) -> bool:
    """Whether a step with this many candidates per row takes the kernel (on a GPU, with Triton)."""
    return ranks <= MAX_RANKS and on_gpu and AVAILABLE


def sample(values: torch.Tensor, tokens: torch.Tensor, rows, u: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """See the module docstring. rows: model.sampling.RowSettings."""
    global _built
    if _built is None:
        _built = _build()
    triton, kernel = _built
    B, R = values.shape
    out = torch.empty(3, B, dtype=torch.long, device=values.device)
    kernel[(B,)](values, tokens, rows.plain, rows.top_k, rows.top_p, rows.greedy, u, seen, out, B, R, seen.shape[1],
                 values.stride(0), tokens.stride(0), seen.stride(0), DIVIDE=not rows.penalises,
                 BLOCK=max(triton.next_power_of_2(R), 16), num_warps=4)
    return out
