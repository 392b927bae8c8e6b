"""The Triton GEMV kernel of the fast path's int8 layers (model/fast/quant.py), for decoding: a few rows of x
against a whole quantized weight, each weight byte read once.

Triton exists only on CUDA machines, so nothing here imports it at module load: int8_gemv() builds its
kernel on first call, and tunes its tile per (rows bucket, N, K) on the first call of a shape (tiles that
suit a 4096-wide layer do not suit the 130528-row LM head, nor one row sixteen).

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

_built = None          # (triton, the kernel, its autotuned form), made on first use


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


def _launch(args, M, N, config, **constants):
    """Run the kernel (built once) on grid (N / BLOCK_N, M / BLOCK_M): tuned, or with `config`."""
    global _built
    if _built is None:
        _built = _build_int8()
    triton, plain, tuned = _built
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
    _launch(args, M, N, config, HAS_BIAS=bias is not None)
    return y
