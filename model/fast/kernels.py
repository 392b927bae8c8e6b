"""The Triton GEMV of the fast path's decoding: a few rows of x against a whole weight, each weight byte
read once. It serves fp16 / bf16 weights at one row (decoding at batch 1: measured faster than cuBLAS on
every layer shape of the 7.8B model on an H200, see docs/benchmarks.md) and the int8 layers of
model/fast/quant.py at up to 16 rows.

Triton exists only on CUDA machines, so nothing here imports it at module load: gemv() builds its kernel
on first call, and tunes its tile per (rows bucket, N, K, weight kind) on the first call of a shape (tiles
that suit a 4096-wide layer do not suit the 130528-row LM head, nor one row sixteen). torch.compile sees
it as one opaque op, visualglm::gemv, so a compiled decoding step has no graph break at each layer.

Tiles are (BLOCK_M rows of x, BLOCK_N output features, BLOCK_K input columns, warps). BLOCK_M 1: one row per
program, products summed on CUDA cores (batch-1 decoding). BLOCK_M 16: up to 16 rows per program through
tl.dot, so each weight is read once for all of them (batched decoding).
"""
import importlib.util
from typing import Optional

import torch

CONFIGS = ((1, 4, 512, 2), (1, 4, 512, 4), (1, 4, 512, 8), (1, 4, 1024, 4), (1, 8, 256, 2), (1, 8, 512, 4),
           (1, 8, 1024, 4), (1, 16, 256, 4), (1, 16, 512, 4), (1, 16, 1024, 8), (1, 32, 128, 4), (1, 32, 256, 4),
           (1, 32, 256, 8), (1, 32, 512, 4), (1, 64, 128, 4), (1, 64, 128, 8),
           # longer rows per step, for the int8 words (a 4096 x 4096 int8 layer ran at 2.2 TB/s with the above)
           (1, 2, 1024, 2), (1, 2, 2048, 4), (1, 4, 2048, 4), (1, 4, 2048, 8), (1, 8, 2048, 8),
           # loads pipelined 2-3 steps ahead (see stages())
           (1, 4, 512, 4, 2), (1, 8, 512, 4, 2), (1, 16, 256, 4, 2), (1, 16, 512, 4, 2), (1, 32, 256, 4, 2),
           (1, 8, 256, 2, 3), (1, 16, 256, 4, 3),
           (16, 32, 128, 4), (16, 64, 64, 4), (16, 64, 128, 4), (16, 128, 64, 4), (16, 32, 256, 4))

_built = None          # (triton, the kernel, its autotuned form), made on first use


# Whether Triton is installed (CUDA builds of torch bring it; a CPU machine may not have it). A constant,
# so that a compiled step reads it without tracing a lookup (which would break its graph at every layer).
AVAILABLE = importlib.util.find_spec("triton") is not None


def rows_bucket(m: int) -> int:
    """The tuning key for m rows: 1, 2, 4, 8 or 16 (a batch of 5 runs the tile tuned for 8)."""
    return 1 << max(m - 1, 0).bit_length()


def _prune(configs, named_args, **kwargs):
    """One row: only the one-row tiles (a 16-row tile would waste 15/16 of its loads of x)."""
    rows = named_args.get("ROWS", kwargs.get("ROWS"))
    return [c for c in configs if c.kwargs["BLOCK_M"] == 1] if rows == 1 else configs


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, ROWS, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
               PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               STAGES: tl.constexpr):
        # ROWS (rows_bucket(M)) is only the tuning key; QUANT: w is int8 with a scale per output row;
        # PACKED: int8 rows read as int32 words of 4 weights (K % 4 == 0, rows 4-byte aligned, on a GPU)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)     # rows of x of this program
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)     # output features of this program
        if BLOCK_M == 1 and PACKED:
            # One row of x against int8 weights, 4 per 32-bit word. Each weight becomes a float with one
            # byte permute: q ^ 0x80 = q + 128 as the low byte under 2^23's exponent, then one subtraction.
            # Per-element int8 -> int32 conversions left this GEMV bound by its instructions, not memory: a
            # token's int8 GEMVs took 2.23 ms that way and 1.97 ms this way on an H200 (docs/benchmarks.md).
            K4 = K // 4
            quad = tl.arange(0, BLOCK_K // 4)
            words = w_ptr.to(tl.pointer_type(tl.int32))
            acc2 = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                k4 = k0 // 4 + quad                                                          # word index
                w = tl.load(words + cols[:, None] * K4 + k4[None, :], mask=(cols[:, None] < N) & (k4[None, :] < K4),
                            other=0, eviction_policy="evict_first")                         # [BN, BK/4]
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    asm="""{
                    .reg .b32 t, m;
                    xor.b32 t, $4, 0x80808080;
                    mov.b32 m, 0x4B000000;
                    prmt.b32 $0, t, m, 0x7440;
                    prmt.b32 $1, t, m, 0x7441;
                    prmt.b32 $2, t, m, 0x7442;
                    prmt.b32 $3, t, m, 0x7443;
                    }""",
                    constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                    is_pure=True, pack=1)                                                   # 2^23 + q + 128
                xs = x_ptr + rows * K + 4 * k4                                              # [BK/4]
                inside = 4 * k4 < K
                x0 = tl.load(xs, mask=inside, other=0.0).to(tl.float32)[None, :]
                x1 = tl.load(xs + 1, mask=inside, other=0.0).to(tl.float32)[None, :]
                x2 = tl.load(xs + 2, mask=inside, other=0.0).to(tl.float32)[None, :]
                x3 = tl.load(xs + 3, mask=inside, other=0.0).to(tl.float32)[None, :]
                acc2 += (w0 - 8388736.0) * x0 + (w1 - 8388736.0) * x1 + (w2 - 8388736.0) * x2 + (w3 - 8388736.0) * x3
            acc = tl.sum(acc2, axis=1)[None, :]                                             # [1, BN]
        elif BLOCK_M == 1:
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)     # summed over K once, after the loop
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                            other=0.0).to(tl.float32)                                       # [1, BK]
                w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                            other=0, eviction_policy="evict_first")                         # [BN, BK]
                if QUANT:
                    # q + 128 in 0..255 as the low bits of 2^23's mantissa: integer ops and one subtraction
                    # instead of int->float conversions, which run at a quarter of the rate (measured
                    # 2.725 -> 2.617 ms for the step's GEMVs on an H200)
                    wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                else:
                    wf = w.to(tl.float32)
                acc2 += wf * x
            acc = tl.sum(acc2, axis=1)[None, :]                                             # [1, BN]
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                            other=0.0)                                                      # [BM, BK]
                w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K),
                            other=0, eviction_policy="evict_first")                         # [BK, BN]
                acc += tl.dot(x, w.to(x.dtype))                    # int8 values are exact in fp16 / bf16
        y = acc
        if QUANT:
            y = y * tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    configs = [triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "BLOCK_K": c[2], "STAGES": stages(c)}, num_warps=c[3])
               for c in CONFIGS]
    tuned = triton.autotune(configs=configs, key=["ROWS", "N", "K", "QUANT", "PACKED"],
                            prune_configs_by={"early_config_prune": _prune})(kernel)
    return triton, kernel, tuned


def gemv(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
         config=None) -> torch.Tensor:
    """x [M, K] fp16/bf16 (contiguous), w [N, K] in x's dtype, or int8 with scale [N]; bias [N] or None
    -> y [M, N] in x's dtype. config (one of CONFIGS) skips the tuning."""
    global _built
    if _built is None:
        _built = _build()
    _, plain, tuned = _built
    M, K = x.shape
    N = w.shape[0]
    quant = w.dtype == torch.int8
    if quant != (scale is not None):
        raise ValueError("an int8 weight needs its row scales, and only an int8 weight takes them")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, w, scale if quant else w, bias if bias is not None else w, y, M, N, K, rows_bucket(M))
    # on a GPU only: Triton's interpreter (CPU tensors, the CPU tests) cannot run the packed path's PTX
    packed = quant and w.is_cuda and K % 4 == 0 and w.data_ptr() % 4 == 0
    launch(tuned, plain, args, dict(QUANT=quant, HAS_BIAS=bias is not None, PACKED=packed), M, N, config, "BLOCK_K")
    return y


def launch(tuned, plain, args, constants: dict, M: int, N: int, config, third: str) -> None:
    """Run a GEMV kernel (this one or kernels_int4's) over its grid of (N / BLOCK_N, M / BLOCK_M) programs:
    the autotuned form, or `plain` at config = (BLOCK_M, BLOCK_N, the tile's third size named `third`, warps)."""
    import triton
    if config is None:
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))](*args, **constants)
    else:
        m, n, t, warps = config[:4]
        plain[(triton.cdiv(N, n), triton.cdiv(M, m))](*args, **constants, BLOCK_M=m, BLOCK_N=n, **{third: t},
                                                        STAGES=stages(config), num_warps=warps)


def stages(config) -> int:
    """A tile's STAGES (its fifth entry, else 1): > 1 pipelines a one-row loop's loads through shared memory
    (cp.async), that many steps ahead; Triton pipelines a plain loop that feeds no tl.dot not at all."""
    return config[4] if len(config) > 4 else 1


# torch.compile traces through this as one op (the kernel itself is launched by gemv() at run time)
@torch.library.custom_op("visualglm::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor],
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    return gemv(x, w, scale, bias)


@gemv_op.register_fake
def _(x, w, scale, bias):
    return x.new_empty(x.shape[0], w.shape[0])
