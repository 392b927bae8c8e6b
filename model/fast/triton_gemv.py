"""The Triton source of kernels.py's GEMV and the epilogue both GEMVs share (this module imports Triton:
it is loaded on first use)."""
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda


@triton.jit
def after_previous(PDL: tl.constexpr):
    """With programmatic dependent launch (kernels.pdl(): Hopper and later), a kernel starts while the one
    before it in the stream still runs: what it does before this call may read only what no earlier kernel
    writes (weights), and it must store nothing. This waits for the previous kernel to finish, then lets
    the next one start. Triggering only after the wait keeps the chain safe for the kernels torch.compile
    makes with PDL (they read two kernels back without a wait)."""
    if PDL:
        tl_cuda.gdc_wait()
        tl_cuda.gdc_launch_dependents()


@triton.jit
def epilogue(y, cols, b_ptr, N, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    """y [rows, BN] fp32 + bias, then GELU's tanh approximation (F.gelu(approximate="tanh")) when asked:
    0.5 y (1 + tanh(u)) = y / (1 + exp(-2 u)), u = sqrt(2 / pi) (y + 0.044715 y^3)."""
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y / (1.0 + tl.exp(-2.0 * u))
    return y


@triton.jit
def kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, ROWS, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
           GELU: tl.constexpr, PACKED: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr):
    # ROWS (rows_bucket(M)) is only the tuning key; QUANT: w is int8 with a scale per output row;
    # PACKED: int8 rows read as int32 words of 4 weights (K % 4 == 0, rows 4-byte aligned, on a GPU);
    # PDL: see after_previous. The one-row loops load each weight tile one step ahead, the first before
    # waiting for x: a chain of the 7.8B model's fp16 GEMVs and LayerNorms in a CUDA graph took 3.21 ms
    # without PDL, 3.12 with PDL waiting first and 3.05 with the first tile read ahead (H200, docs/benchmarks.md)
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
        w_next = tl.load(words + cols[:, None] * K4 + quad[None, :], mask=(cols[:, None] < N) & (quad[None, :] < K4),
                         other=0, eviction_policy="evict_first")                        # [BN, BK/4], tile 0
        after_previous(PDL)
        for k0 in range(0, K, BLOCK_K):
            k4 = k0 // 4 + quad                                                          # word index
            w = w_next
            ahead = k4 + BLOCK_K // 4
            w_next = tl.load(words + cols[:, None] * K4 + ahead[None, :],
                             mask=(cols[:, None] < N) & (ahead[None, :] < K4), other=0,
                             eviction_policy="evict_first")                             # the next step's tile
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
        ks = tl.arange(0, BLOCK_K)
        w_next = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                         other=0, eviction_policy="evict_first")                        # [BN, BK], tile 0
        after_previous(PDL)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = w_next
            ahead = ks + BLOCK_K
            w_next = tl.load(w_ptr + cols[:, None] * K + ahead[None, :],
                             mask=(cols[:, None] < N) & (ahead[None, :] < K), other=0,
                             eviction_policy="evict_first")                             # the next step's tile
            x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                        other=0.0).to(tl.float32)                                       # [1, BK]
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
        after_previous(PDL)
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
    y = epilogue(y, cols, b_ptr, N, HAS_BIAS, GELU)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
