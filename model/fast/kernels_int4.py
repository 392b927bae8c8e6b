"""The Triton GEMV of the fast path's int4 layers (model/fast/quant.py's Int4Linear): a few rows of x
against a whole int4 weight, each weight byte read once.

Layout (pack_words): a row's K weights fall in groups of G = 8 W (128, or 64 / 32 for narrow layers), each
with its own scale and zero, w = (q - 8) * scale + zero, q in 0..15. Group g is an 8 x W grid: weight
k = g G + i W + j is nibble i of the group's 32-bit word j (the low nibble of byte i for i < 4, the high
nibble of byte i - 4 after). So a word's 8 weights meet 8 runs of x that are each contiguous across the
words of a tile (vector loads), and one word becomes 8 floats with 3 integer ops and 8 byte permutes
(`prmt`, on the GPU): the nibble as mantissa bits 16..19 under the exponent of 0.5, f = 0.5 + q / 256.
A group's sum is then exact algebra with no per-weight subtraction:
    sum_k w_k x_k = 256 s sum_k f_k x_k + (z - 136 s) sum_k x_k.
Per weight that is 11/8 integer ops and one multiply-add; tinygemm's int4 GEMV (the previous path,
1.0-2.1 TB/s on an H200) and our earlier Triton int4 GEMVs were bound by their per-weight unpacking.

BLOCK_M 1: one row of x per program on CUDA cores (batch-1 decoding). BLOCK_M 16: up to 16 rows through
tl.dot, each of the 8 nibble planes dequantized to x's dtype and multiplied by its own run of x (a
sum over K in any order is the same sum), so batched decoding reads each weight once.
Triton's interpreter (the CPU tests) cannot run PTX: there the nibbles are taken with shifts and masks,
the same values by the same algebra.
"""
from typing import Optional

import torch

from .kernels import AVAILABLE, rows_bucket  # noqa: F401  (AVAILABLE: callers ask this module too)

# (BLOCK_M rows, BLOCK_N output features, BLOCK_G groups per step along K, warps)
CONFIGS = ((1, 4, 2, 2), (1, 4, 4, 4), (1, 8, 1, 2), (1, 8, 2, 4), (1, 8, 4, 4), (1, 16, 1, 4), (1, 16, 2, 4),
           (1, 16, 4, 8), (1, 32, 1, 4), (1, 32, 2, 8), (1, 64, 1, 8),
           (16, 32, 4, 4), (16, 64, 2, 4), (16, 64, 4, 8), (16, 128, 2, 8))

_built = None


def _prune(configs, named_args, **kwargs):
    """One row: only the one-row tiles; more: only tl.dot's (a one-row tile reads the weight once per row)."""
    rows = named_args.get("ROWS", kwargs.get("ROWS"))
    words = named_args.get("W", kwargs.get("W"))          # tl.dot needs 16 or more words per step
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 1) == (rows == 1)
            and (c.kwargs["BLOCK_M"] == 1 or c.kwargs["BLOCK_G"] * words >= 16)]


def _build():
    import triton

    from .triton_int4 import kernel
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_G": g}, num_warps=w) for m, n, g, w in CONFIGS]
    tuned = triton.autotune(configs=configs, key=["ROWS", "N", "K", "W"],
                            prune_configs_by={"early_config_prune": _prune})(kernel)
    return triton, kernel, tuned


def gemv(x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config=None) -> torch.Tensor:
    """x [M, K] (contiguous), words [N, K/8] int32 (pack_words), scales_and_zeros [N, K/G, 2]; bias [N]
    or None -> y [M, N] in x's dtype. config (one of CONFIGS) skips the tuning."""
    global _built
    if _built is None:
        _built = _build()
    triton, plain, tuned = _built
    M, K = x.shape
    N, groups = scales_and_zeros.shape[:2]
    if words.dtype != torch.int32 or words.shape != (N, K // 8) or K % groups or (K // groups) % 8:
        raise ValueError(f"int4 words {tuple(words.shape)} {words.dtype} and {groups} groups do not fit x [{M}, {K}]")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, words, scales_and_zeros, bias if bias is not None else scales_and_zeros, y, M, N, K, rows_bucket(M))
    constants = dict(W=K // groups // 8, HAS_BIAS=bias is not None, ASM=x.is_cuda)
    if config is None:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
        tuned[grid](*args, **constants)
    else:
        m, n, g, warps = config
        plain[(triton.cdiv(N, n), triton.cdiv(M, m))](*args, **constants, BLOCK_M=m, BLOCK_N=n, BLOCK_G=g,
                                                        num_warps=warps)
    return y


@torch.library.custom_op("visualglm::gemv_int4", mutates_args=())
def gemv_op(x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    return gemv(x, words, scales_and_zeros, bias)


@gemv_op.register_fake
def _(x, words, scales_and_zeros, bias):
    return x.new_empty(x.shape[0], words.shape[0])
