"""The Triton source of kernels_int4.py's GEMV (this module imports Triton: it is loaded on first use)."""
import triton
import triton.language as tl


@triton.jit
def floats(w, ASM: tl.constexpr):
    """int32 words -> their 8 nibbles as fp32 0.5 + q / 256, in the order of the layout."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi, m;
            and.b32 lo, $8, 0x0F0F0F0F;
            shr.u32 hi, $8, 4;
            and.b32 hi, hi, 0x0F0F0F0F;
            mov.b32 m, 0x3F000000;
            prmt.b32 $0, lo, m, 0x7054;
            prmt.b32 $1, lo, m, 0x7154;
            prmt.b32 $2, lo, m, 0x7254;
            prmt.b32 $3, lo, m, 0x7354;
            prmt.b32 $4, hi, m, 0x7054;
            prmt.b32 $5, hi, m, 0x7154;
            prmt.b32 $6, hi, m, 0x7254;
            prmt.b32 $7, hi, m, 0x7354;
            }""",
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[w],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                   tl.float32), is_pure=True, pack=1)
    else:
        return (((w >> 0) & 15).to(tl.float32) / 256 + 0.5, ((w >> 8) & 15).to(tl.float32) / 256 + 0.5,
                ((w >> 16) & 15).to(tl.float32) / 256 + 0.5, ((w >> 24) & 15).to(tl.float32) / 256 + 0.5,
                ((w >> 4) & 15).to(tl.float32) / 256 + 0.5, ((w >> 12) & 15).to(tl.float32) / 256 + 0.5,
                ((w >> 20) & 15).to(tl.float32) / 256 + 0.5, ((w >> 28) & 15).to(tl.float32) / 256 + 0.5)

@triton.jit
def kernel(x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, M, N, K, ROWS, W: tl.constexpr, HAS_BIAS: tl.constexpr,
           ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    # x [M, K], w [N, K/8] int32 words, sz [N, K/G, 2] (scale, zero); ROWS: the tuning key only
    G = 8 * W
    groups = K // G
    K8 = K // 8
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if BLOCK_M == 1:
        n = cols[:, None, None]                                               # [BN, 1, 1]
        j = tl.arange(0, W)[None, None, :]                                    # [1, 1, W]
        acc = tl.zeros((BLOCK_N, BLOCK_G, W), dtype=tl.float32)
        for g0 in range(0, groups, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)[None, :, None]                     # [1, BG, 1]
            live = (n < N) & (g < groups)
            w = tl.load(w_ptr + n * K8 + g * W + j, mask=live & (j < W), other=0,
                        eviction_policy="evict_first")                         # [BN, BG, W] int32
            s = tl.load(sz_ptr + (n * groups + g) * 2, mask=live, other=0.0).to(tl.float32)      # [BN, BG, 1]
            z = tl.load(sz_ptr + (n * groups + g) * 2 + 1, mask=live, other=0.0).to(tl.float32)
            xs = x_ptr + tl.program_id(1) * K + g * G + j                              # [1, BG, W]: plane 0's run
            inside = (g < groups) & (j < W)
            x0 = tl.load(xs, mask=inside, other=0.0).to(tl.float32)
            x1 = tl.load(xs + W, mask=inside, other=0.0).to(tl.float32)
            x2 = tl.load(xs + 2 * W, mask=inside, other=0.0).to(tl.float32)
            x3 = tl.load(xs + 3 * W, mask=inside, other=0.0).to(tl.float32)
            x4 = tl.load(xs + 4 * W, mask=inside, other=0.0).to(tl.float32)
            x5 = tl.load(xs + 5 * W, mask=inside, other=0.0).to(tl.float32)
            x6 = tl.load(xs + 6 * W, mask=inside, other=0.0).to(tl.float32)
            x7 = tl.load(xs + 7 * W, mask=inside, other=0.0).to(tl.float32)
            f0, f1, f2, f3, f4, f5, f6, f7 = floats(w, ASM)
            fx = f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3 + f4 * x4 + f5 * x5 + f6 * x6 + f7 * x7
            xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))         # [1, BG, W]
            acc += fx * (256 * s) + xsum * (z - 136 * s)
        y = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]                      # [1, BN]
    else:
        BKW: tl.constexpr = BLOCK_G * W                                       # words per step
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for w0 in range(0, K8, BKW):
            word = w0 + tl.arange(0, BKW)                                     # [BKW] word of the row
            g = word // W
            live = (word[:, None] < K8) & (cols[None, :] < N)
            w = tl.load(w_ptr + cols[None, :] * K8 + word[:, None], mask=live, other=0,
                        eviction_policy="evict_first")                         # [BKW, BN]
            sz = sz_ptr + (cols[None, :] * groups + g[:, None]) * 2
            s = tl.load(sz, mask=live, other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=live, other=0.0).to(tl.float32)
            a, b = 256 * s, z - 136 * s
            xs = x_ptr + rows[:, None] * K + (g * G + word % W)[None, :]       # [BM, BKW]: plane 0's run
            inside = (rows[:, None] < M) & (word[None, :] < K8)
            f0, f1, f2, f3, f4, f5, f6, f7 = floats(w, ASM)
            x0 = tl.load(xs, mask=inside, other=0.0)
            dt = x0.dtype
            acc += tl.dot(x0, (f0 * a + b).to(dt))
            acc += tl.dot(tl.load(xs + W, mask=inside, other=0.0), (f1 * a + b).to(dt))
            acc += tl.dot(tl.load(xs + 2 * W, mask=inside, other=0.0), (f2 * a + b).to(dt))
            acc += tl.dot(tl.load(xs + 3 * W, mask=inside, other=0.0), (f3 * a + b).to(dt))
            acc += tl.dot(tl.load(xs + 4 * W, mask=inside, other=0.0), (f4 * a + b).to(dt))
            acc += tl.dot(tl.load(xs + 5 * W, mask=inside, other=0.0), (f5 * a + b).to(dt))
            acc += tl.dot(tl.load(xs + 6 * W, mask=inside, other=0.0), (f6 * a + b).to(dt))
            acc += tl.dot(tl.load(xs + 7 * W, mask=inside, other=0.0), (f7 * a + b).to(dt))
        y = acc
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
