"""The Triton GEMV of the fast path's int4 layers (model/fast/quant.py's Int4Linear): a few rows of x
against a whole int4 weight, each weight byte read once. The kernel itself is in triton_int4.py.

Weights: w = (q - 8) * scale with q in 0..15, one scale per group of G = 8 W input columns (128, or 64 /
32 for narrow layers), eight nibbles to a 32-bit word (quant.py's pack_words): weight k = g G + 2 (p W +
j) + e of a row is element e of pair p of the row's word g W + j. A word's 8 weights thus meet 4 words of
x (pairs of fp16), each run contiguous across the words of a tile.

BLOCK_M 1 (batch-1 decoding): one row of x per program. With fp16 x on a GPU each word is multiplied in
fp16x2 by inline PTX (16 instructions for 8 weights, no per-weight conversion to fp32; a first version
with the nibbles as fp32 floats was bound by its instructions at 1.0-1.5 TB/s, below torch's tinygemm);
elsewhere (bf16 x, Triton's interpreter in the CPU tests) the nibbles are taken with shifts, the same
values in fp32. Measured on an H200 (docs/benchmarks.md): a token's int4 GEMVs 1.52 ms against
tinygemm's 1.96, relative error 4.5e-4 against the fp32 product (tinygemm, in bf16: 3.4e-3). With PDL
(kernels.pdl) each program reads its first words before waiting for the previous kernel, and every
next step's one step ahead.

BLOCK_M 16-64: that many rows through tl.dot, each (pair, element) plane dequantized and multiplied by its
own columns of x, so batched decoding and prompts read and unpack each weight once per tile of rows.
"""
from typing import Optional

import torch

# (AVAILABLE: callers ask this module too)
from .kernels import AVAILABLE, graph_bench, launch, pdl_options, rows_bucket  # noqa: F401

# (BLOCK_M rows, BLOCK_N output features, BLOCK_G groups per step along K, warps)
CONFIGS = ((1, 2, 8, 4), (1, 4, 2, 2), (1, 4, 4, 4), (1, 4, 8, 4), (1, 4, 8, 8), (1, 4, 16, 8), (1, 8, 1, 2),
           (1, 8, 2, 4), (1, 8, 4, 4), (1, 8, 8, 4), (1, 8, 8, 8), (1, 16, 1, 4), (1, 16, 2, 4), (1, 16, 4, 4),
           (1, 16, 4, 8), (1, 32, 1, 4), (1, 32, 2, 8), (1, 64, 1, 8),
           (16, 32, 4, 4), (16, 64, 2, 4), (16, 64, 4, 8), (16, 128, 2, 8), (32, 64, 2, 4), (64, 64, 2, 4),
           (64, 128, 2, 8))

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
    even = triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["GROUPS"] % a["BLOCK_G"] == 0})(kernel)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_G": g}, num_warps=w) for m, n, g, w in CONFIGS]
    tuned = triton.autotune(configs=configs, key=["ROWS", "N", "KW", "W"],
                            prune_configs_by={"early_config_prune": _prune}, do_bench=graph_bench)(even)
    return even, tuned


def gemv(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config=None, gelu: bool = False) -> torch.Tensor:
    """x [M, K] (contiguous), words [N, K/8] int32 (pack_words), scales [N, K/G]; bias [N] or None
    -> y [M, N] in x's dtype; gelu as in kernels.gemv. config (one of CONFIGS) skips the tuning."""
    global _built
    if _built is None:
        _built = _build()
    plain, tuned = _built
    M, K = x.shape
    N, groups = scales.shape
    if words.dtype != torch.int32 or words.shape != (N, K // 8) or K % groups or (K // groups) % 8:
        raise ValueError(f"int4 words {tuple(words.shape)} {words.dtype} and {groups} groups do not fit x [{M}, {K}]")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, words, scales, bias if bias is not None else scales, y, M, N, K // 8, groups, rows_bucket(M))
    # fp16x2 PTX: fp16 x, read as 32-bit words (its rows start on 4-byte boundaries: K is a multiple of 32)
    asm = x.is_cuda and x.dtype == torch.float16 and x.data_ptr() % 4 == 0
    launch(tuned, plain, args, dict(W=K // groups // 8, HAS_BIAS=bias is not None, GELU=gelu, ASM=asm,
                                    **pdl_options(x.device)), M, N, config, "BLOCK_G")
    return y


@torch.library.custom_op("visualglm::gemv_int4", mutates_args=())
def gemv_op(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
            gelu: bool = False) -> torch.Tensor:
    return gemv(x, words, scales, bias, gelu=gelu)


@gemv_op.register_fake
def _(x, words, scales, bias, gelu=False):
    return x.new_empty(x.shape[0], words.shape[0])
