"""Triton GEMV kernels of the fast path's weight-only layers (model/fast/quant.py), for decoding: a few rows
of x against a whole quantized weight, each weight byte read once.

Triton exists only on CUDA machines, so nothing here imports it at module load: int8_gemv() / int4_gemv()
build their kernel on first call. Both tune their tile per (rows bucket, N, K) on the first call of a shape
(tiles that suit a 4096-wide layer do not suit the 130528-row LM head, nor one row sixteen).

Tiles are (BLOCK_M rows of x, BLOCK_N output features, BLOCK_K input columns, warps). BLOCK_M 1: one row per
program, products summed on CUDA cores (batch-1 decoding). BLOCK_M 16: up to 16 rows per program through
tl.dot, so each weight is read once for all of them (batched decoding).
"""
import torch

# -- int8: w = q * scale[n], q int8 [N, K] -------------------------------------------------------------
INT8_CONFIGS = ((1, 4, 512, 2), (1, 8, 256, 2), (1, 8, 512, 4), (1, 8, 1024, 4), (1, 16, 256, 4),
                (1, 16, 512, 4), (1, 16, 1024, 8), (1, 32, 128, 4), (1, 32, 256, 4), (1, 32, 256, 8),
                (1, 64, 128, 4), (1, 64, 128, 8),
                (16, 32, 128, 4), (16, 64, 64, 4), (16, 64, 128, 4), (16, 128, 64, 4), (16, 32, 256, 4))

# -- int4: w = (q - 8) * scale[g, n] + zero[g, n], g = k // GROUP --------------------------------------
# BLOCK_K is a multiple of the layer's group (every group size, 32..128, divides 128); a tile's BLOCK_K
# columns are handled one group at a time. Small BLOCK_N with long BLOCK_K keeps many bytes in flight per
# program while the grid still has N / BLOCK_N programs (1024 for a 4096-row layer at BLOCK_N 4).
INT4_CONFIGS = ((1, 4, 512, 2), (1, 4, 1024, 4), (1, 8, 256, 2), (1, 8, 512, 4), (1, 8, 1024, 4),
                (1, 16, 256, 4), (1, 16, 512, 4), (1, 16, 1024, 8), (1, 32, 128, 4), (1, 32, 256, 4),
                (1, 64, 128, 4),
                (16, 16, 256, 4), (16, 32, 128, 4), (16, 32, 256, 4), (16, 64, 128, 4), (16, 128, 128, 4))

_built = {}


def rows_bucket(m: int) -> int:
    """The tuning key for m rows: 1, 2, 4, 8 or 16 (a batch of 5 runs the tile tuned for 8)."""
    return 1 << max(m - 1, 0).bit_length()


def _configs(triton, tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for m, n, k, w in tiles]


def _build_int8():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, ROWS, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # ROWS (rows_bucket(M)) is only the tuning key
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)     # rows of x of this program
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)     # output features of this program
        if BLOCK_M == 1:
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)     # summed over K once, after the loop
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                            other=0.0).to(tl.float32)                                       # [1, BK]
                w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                            other=0, eviction_policy="evict_first").to(tl.float32)          # [BN, BK]
                acc2 += w * x
            acc = tl.sum(acc2, axis=1)[None, :]                                             # [1, BN]
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                            other=0.0)                                                      # [BM, BK]
                w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K),
                            other=0, eviction_policy="evict_first")                         # [BK, BN] int8
                acc += tl.dot(x, w.to(x.dtype))                    # int8 values are exact in fp16 / bf16
        y = acc * tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    return triton, gemv, triton.autotune(configs=_configs(triton, INT8_CONFIGS), key=["ROWS", "N", "K"])(gemv)


def _build_int4():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, p_ptr, sz_ptr, b_ptr, y_ptr, M, N, K, K2, ROWS, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # x [M, K]; p [N, K2 = K/2] uint8, byte j = q[2j] << 4 | q[2j+1]; sz [K/GROUP, N, 2] (scale, zero);
        # y [M, N]. K2 is its own argument so that Triton sees its divisibility by 16 (wide byte loads).
        # Per group: sum_k w_k x_k = scale * sum_k (q_k - 8) x_k + zero * sum_k x_k.
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)     # rows of x of this program
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)     # output features of this program
        half = tl.arange(0, GROUP // 2)                               # byte columns of one group
        rmask, cmask = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            for g in tl.static_range(BLOCK_K // GROUP):
                kg = k0 + g * GROUP                                   # first column of this group
                byte = kg // 2 + half                                 # [G/2] byte columns of the group
                kmask = byte < K2                                     # K is a multiple of GROUP: all or none
                pb = tl.load(p_ptr + cols[:, None] * K2 + byte[None, :], mask=cmask[:, None] & kmask[None, :],
                             other=0, eviction_policy="evict_first")  # [BN, G/2] uint8
                x_at = x_ptr + rows[:, None] * K + 2 * byte[None, :]
                xmask = rmask[:, None] & kmask[None, :]
                xe = tl.load(x_at, mask=xmask, other=0.0)             # [BM, G/2] even columns
                xo = tl.load(x_at + 1, mask=xmask, other=0.0)         # [BM, G/2] odd columns
                gmask = cmask & (kg + 0 * cols < K)                   # [BN]
                sz_at = sz_ptr + ((kg // GROUP) * N + cols) * 2
                scale = tl.load(sz_at, mask=gmask, other=0.0).to(tl.float32)              # [BN]
                zero = tl.load(sz_at + 1, mask=gmask, other=0.0).to(tl.float32)           # [BN]
                # nibbles -> float32 q - 8 exactly by bits, not int->float converts (a quarter of the FP32
                # rate, they would bound the kernel): OR-ing q into the mantissa of 2**23 (bits 0x4B000000)
                # gives the float 2**23 + q; subtract 2**23 + 8.
                qe = ((pb >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0   # [BN, G/2]
                qo = ((pb & 15).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0   # [BN, G/2]
                if BLOCK_M == 1:
                    xef, xof = xe.to(tl.float32), xo.to(tl.float32)
                    dots = tl.sum(qe * xef + qo * xof, axis=1)[None, :]                   # [1, BN]
                    xsum = tl.sum(xef + xof, axis=1)[:, None]                             # [1, 1]
                else:
                    # q - 8 in -8..7 is exact in fp16 / bf16, so the tensor cores see the exact weights
                    dots = tl.dot(xe, tl.trans(qe.to(xe.dtype))) + tl.dot(xo, tl.trans(qo.to(xo.dtype)))  # [BM, BN]
                    xsum = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)[:, None]              # [BM, 1]
                acc += dots * scale[None, :] + xsum * zero[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    return triton, gemv, triton.autotune(configs=_configs(triton, INT4_CONFIGS), key=["ROWS", "N", "K", "GROUP"])(gemv)


def _launch(name, args, M, N, config, **constants):
    """Run kernel `name` (built once) on grid (N / BLOCK_N, M / BLOCK_M): tuned, or with `config`."""
    if name not in _built:
        _built[name] = (_build_int8 if name == "int8" else _build_int4)()
    triton, plain, tuned = _built[name]
    if config is None:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
        tuned[grid](*args, **constants)
    else:
        m, n, k, warps = config
        plain[(triton.cdiv(N, n), triton.cdiv(M, m))](*args, **constants, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k,
                                                        num_warps=warps)


def int8_gemv(x, w, scale, bias, config=None):
    """x [M, K] fp16/bf16 (contiguous), w [N, K] int8, scale [N], bias [N] or None -> y [M, N] in x's dtype.
    config (one of INT8_CONFIGS) skips the tuning."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, w, scale, bias if bias is not None else scale, y, M, N, K, rows_bucket(M))
    _launch("int8", args, M, N, config, HAS_BIAS=bias is not None)
    return y


def int4_gemv(x, packed, scales_and_zeros, group, bias, config=None):
    """x [M, K] (contiguous), packed [N, K/2] uint8 (pack_int4), scales_and_zeros [K/group, N, 2],
    bias [N] or None -> y [M, N] in x's dtype. config (one of INT4_CONFIGS) skips the tuning."""
    M, K = x.shape
    N = packed.shape[0]
    assert packed.shape[1] * 2 == K and K % group == 0 and scales_and_zeros.shape == (K // group, N, 2)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, packed, scales_and_zeros, bias if bias is not None else scales_and_zeros, y, M, N, K, K // 2, rows_bucket(M))
    _launch("int4", args, M, N, config, GROUP=group, HAS_BIAS=bias is not None)
    return y
