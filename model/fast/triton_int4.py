"""The Triton source of kernels_int4.py's GEMV (this module imports Triton: it is loaded on first use).

A word holds 8 weights of one group as 4 pairs (p) of neighbours (e = 0, 1); the pair's x is one 32-bit
word of two fp16 values, and pair p's nibbles sit at bits SHIFTS[p] of model/fast/quant.py:
(0, 16), (8, 24), (4, 20), (12, 28). On the GPU, in fp16, one `lop3` per pair puts both nibbles under
the exponent of 1024 (0x6400 | q = 1024 + q, or 1024 + 16 q for the upper nibbles of a byte), one fp16x2
fma turns them into d = (q - 8) / 8 exactly, and three more fp16x2 fmas sum the word's 8 products d x,
four per half, then the halves (|sum| <= 8 max|x|: no overflow), converted to fp32 once per word. The
word's sum is then scaled by 8 * its group's scale into an fp32 accumulator.
"""
import triton
import triton.language as tl

from .triton_gemv import after_previous, epilogue

WORD_DOT = tl.constexpr("""{
.reg .b32 t0, t1, t2, t3, w8, s0, b0, s1, b1, acc;
.reg .b16 lo, hi;
mov.b32 s0, 0x30003000;
mov.b32 b0, 0xD808D808;
mov.b32 s1, 0x20002000;
mov.b32 b1, 0xC880C880;
lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t2, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 w8, $1, 8;
lop3.b32 t1, w8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 t0, t0, s0, b0;
fma.rn.f16x2 t1, t1, s0, b0;
fma.rn.f16x2 t2, t2, s1, b1;
fma.rn.f16x2 t3, t3, s1, b1;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
fma.rn.f16x2 acc, t2, $4, acc;
fma.rn.f16x2 acc, t3, $5, acc;
mov.b32 {lo, hi}, acc;
add.rn.f16 lo, lo, hi;
cvt.f32.f16 $0, lo;
}""")
# t0..t3: pairs 0..3; 0x3000 = 1/8, 0xD808 = -129: (1024 + q) / 8 - 129 = (q - 8) / 8;
# 0x2000 = 1/128, 0xC880 = -9: (1024 + 16 q) / 128 - 9 = (q - 8) / 8. lop3 0xEA: (a & b) | c.


@triton.jit
def nibble(w, shift):
    """(q - 8) / 8 in fp32 of the nibble at bit `shift` of each word (the portable path)."""
    return ((w >> shift) & 15).to(tl.float32) * 0.125 - 1.0


@triton.jit
def kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, KW, GROUPS, ROWS, W: tl.constexpr, HAS_BIAS: tl.constexpr,
           GELU: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    # x [M, K = 8 KW], w [N, KW] int32 words, s [N, GROUPS] group scales; ROWS is the tuning key only;
    # EVEN: N and GROUPS are multiples of the tile (no masks). KW and GROUPS come as arguments, not derived
    # from K, so that Triton knows their divisibility and loads 4 words at a time.
    # Weight k = g G + 2 (p W + j) + e of a row is pair p, element e of its word g W + j (G = 8 W).
    G = 8 * W
    K = 8 * KW
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if BLOCK_M == 1:
        n = cols[:, None, None]                                               # [BN, 1, 1]
        g = tl.arange(0, BLOCK_G)[None, :, None]                              # [1, BG, 1]
        j = tl.arange(0, W)[None, None, :]                                    # [1, 1, W]
        ws = w_ptr + n * KW + g * W + j                                       # [BN, BG, W], advanced per step
        ss = s_ptr + n * GROUPS + g                                           # [BN, BG, 1]
        if ASM:
            xs = x_ptr.to(tl.pointer_type(tl.int32)) + tl.program_id(1) * (4 * KW) + g * (4 * W) + j   # pair 0
        else:
            xs = x_ptr + tl.program_id(1) * K + g * G + 2 * j                     # pair 0, element 0
        acc = tl.zeros((BLOCK_N, BLOCK_G, W), dtype=tl.float32)
        # each step's words and scales are loaded one step ahead, the first before after_previous (see there)
        if EVEN:
            w_next = tl.load(ws, eviction_policy="evict_first")                   # [BN, BG, W] int32
            s_next = tl.load(ss)                                                  # [BN, BG, 1]
        else:
            live = (n < N) & (g < GROUPS)
            w_next = tl.load(ws, mask=live, other=0, eviction_policy="evict_first")        # live broadcasts
            s_next = tl.load(ss, mask=live, other=0.0)
        after_previous(PDL)
        for g0 in range(0, GROUPS, BLOCK_G):
            w, s8 = w_next, s_next.to(tl.float32) * 8
            ws += BLOCK_G * W
            ss += BLOCK_G
            live = g0 + BLOCK_G + g < GROUPS                                      # [1, BG, 1]: the next step
            if not EVEN:
                live = live & (n < N)
            w_next = tl.load(ws, mask=live, other=0, eviction_policy="evict_first")
            s_next = tl.load(ss, mask=live, other=0.0)
            inside = (g0 + g < GROUPS) | EVEN                                    # [1, BG, 1]
            if ASM:
                x0 = tl.load(xs, mask=inside, other=0)                          # pair 0's two fp16 as a word
                x1 = tl.load(xs + W, mask=inside, other=0)
                x2 = tl.load(xs + 2 * W, mask=inside, other=0)
                x3 = tl.load(xs + 3 * W, mask=inside, other=0)
                part = tl.inline_asm_elementwise(asm=WORD_DOT, constraints="=r,r,r,r,r,r", args=[w, x0, x1, x2, x3],
                                                 dtype=tl.float32, is_pure=True, pack=1)
                xs += BLOCK_G * 4 * W
            else:
                part = (nibble(w, 0) * tl.load(xs, mask=inside, other=0.0).to(tl.float32)
                        + nibble(w, 16) * tl.load(xs + 1, mask=inside, other=0.0).to(tl.float32)
                        + nibble(w, 8) * tl.load(xs + 2 * W, mask=inside, other=0.0).to(tl.float32)
                        + nibble(w, 24) * tl.load(xs + 2 * W + 1, mask=inside, other=0.0).to(tl.float32)
                        + nibble(w, 4) * tl.load(xs + 4 * W, mask=inside, other=0.0).to(tl.float32)
                        + nibble(w, 20) * tl.load(xs + 4 * W + 1, mask=inside, other=0.0).to(tl.float32)
                        + nibble(w, 12) * tl.load(xs + 6 * W, mask=inside, other=0.0).to(tl.float32)
                        + nibble(w, 28) * tl.load(xs + 6 * W + 1, mask=inside, other=0.0).to(tl.float32))
                xs += BLOCK_G * G
            acc += part * s8
        y = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]                      # [1, BN]
    else:
        # up to BLOCK_M rows through tl.dot: each (pair, element) plane of the words dequantized on its own
        # and multiplied by its own columns of x (a sum over K in any order is the same sum)
        BKW: tl.constexpr = BLOCK_G * W                                       # words per step
        after_previous(PDL)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for w0 in range(0, KW, BKW):
            word = w0 + tl.arange(0, BKW)                                     # [BKW] word of the row
            g = word // W
            live = (word[:, None] < KW) & (cols[None, :] < N)
            w = tl.load(w_ptr + cols[None, :] * KW + word[:, None], mask=live, other=0,
                        eviction_policy="evict_first")                         # [BKW, BN]
            s8 = tl.load(s_ptr + cols[None, :] * GROUPS + g[:, None], mask=live, other=0.0).to(tl.float32) * 8
            xs = x_ptr + rows[:, None] * K + (g * G + 2 * (word % W))[None, :]  # [BM, BKW]: pair 0, element 0
            inside = (rows[:, None] < M) & (word[None, :] < KW)
            x = tl.load(xs, mask=inside, other=0.0)
            dt = x.dtype
            acc += tl.dot(x, (nibble(w, 0) * s8).to(dt))
            acc += tl.dot(tl.load(xs + 1, mask=inside, other=0.0), (nibble(w, 16) * s8).to(dt))
            acc += tl.dot(tl.load(xs + 2 * W, mask=inside, other=0.0), (nibble(w, 8) * s8).to(dt))
            acc += tl.dot(tl.load(xs + 2 * W + 1, mask=inside, other=0.0), (nibble(w, 24) * s8).to(dt))
            acc += tl.dot(tl.load(xs + 4 * W, mask=inside, other=0.0), (nibble(w, 4) * s8).to(dt))
            acc += tl.dot(tl.load(xs + 4 * W + 1, mask=inside, other=0.0), (nibble(w, 20) * s8).to(dt))
            acc += tl.dot(tl.load(xs + 6 * W, mask=inside, other=0.0), (nibble(w, 12) * s8).to(dt))
            acc += tl.dot(tl.load(xs + 6 * W + 1, mask=inside, other=0.0), (nibble(w, 28) * s8).to(dt))
        y = acc
    y = epilogue(y, cols, b_ptr, N, HAS_BIAS, GELU)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
