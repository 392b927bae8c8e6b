"""Weight-only int8 / int4 layers for the fast path, and quantize_glm(), which swaps them into a FastGLM.

int8  per output row, symmetric (the scheme of model/quant.py). On CUDA, inputs of at most SMALL_M rows
      (decoding) go through a Triton GEMV that reads each int8 weight once (half the bytes of fp16) and
      applies the row scale at the end. Larger inputs (prefill) dequantize and matmul.
int4  per group of GROUP input columns (fewer for narrow layers), asymmetric: w ~ (q - 8) * scale + zero with q in [0, 15], the
      layout of torch's tinygemm kernel. On CUDA the weight is packed by aten._convert_weight_to_int4pack
      and multiplied by aten._weight_int4pack_mm (bf16 activations); elsewhere the same values are
      dequantized and multiplied, so the CPU path computes the same function.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import dequantize, quantize_weight

GROUP = 128            # int4: input columns per (scale, zero)
INNER_K_TILES = 8      # int4: tinygemm's packing parameter
SMALL_M = 16           # int8: rows of input that still take the GEMV kernel


# -- int8 ------------------------------------------------------------------------------------------
# Tiles, (BLOCK_M rows of x, BLOCK_N output features, BLOCK_K input columns, warps). BLOCK_M 1: one row
# per program, products summed on CUDA cores (batch-1 decoding). BLOCK_M 16: up to 16 rows per program
# through tl.dot, so each int8 weight is read once for all of them (batched decoding). Triton times every
# tile on the first call for a weight shape and row-count bucket and keeps the fastest (tiles that suit a
# 4096-wide layer do not suit the 130528-row LM head, nor one row sixteen).
GEMV_CONFIGS = ((1, 4, 512, 2), (1, 8, 256, 2), (1, 8, 512, 4), (1, 8, 1024, 4), (1, 16, 256, 4),
                (1, 16, 512, 4), (1, 16, 1024, 8), (1, 32, 128, 4), (1, 32, 256, 4), (1, 32, 256, 8),
                (1, 64, 128, 4), (1, 64, 128, 8),
                (16, 32, 128, 4), (16, 64, 64, 4), (16, 64, 128, 4), (16, 128, 64, 4), (16, 32, 256, 4))
_gemv = None


def _rows_bucket(m: int) -> int:
    """The tuning key for m rows: 1, 2, 4, 8 or 16 (a batch of 5 runs the tile tuned for 8)."""
    return 1 << max(m - 1, 0).bit_length()


def _int8_gemv_kernel():
    """The Triton kernel, compiled on first use (Triton is only imported on CUDA machines). Returns
    run(x, w, scale, bias, config=None): config (one of GEMV_CONFIGS) skips the tuning."""
    global _gemv
    if _gemv is not None:
        return _gemv
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, ROWS, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # ROWS (_rows_bucket(M)) is only the tuning key
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

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for m, n, k, w in GEMV_CONFIGS]
    tuned = triton.autotune(configs=configs, key=["ROWS", "N", "K"])(gemv)

    def run(x, w, scale, bias, config=None):
        M, K = x.shape
        N = w.shape[0]
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        args = (x, w, scale, bias if bias is not None else scale, y, M, N, K, _rows_bucket(M))
        if config is None:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
            tuned[grid](*args, HAS_BIAS=bias is not None)
        else:
            m, n, k, warps = config
            gemv[(triton.cdiv(N, n), triton.cdiv(M, m))](*args, HAS_BIAS=bias is not None, BLOCK_M=m, BLOCK_N=n,
                                                          BLOCK_K=k, num_warps=warps)
        return y

    _gemv = run
    return run


@torch.compiler.disable
def _int8_gemv(x, w, scale, bias):
    """Called as it is inside a compiled step (inductor's own fusion of int8 -> matmul measured slower)."""
    return _int8_gemv_kernel()(x, w, scale, bias)


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        q, scale = quantize_weight(weight, 8)                        # [N, K] int8, [N]
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = bias

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda and x2.shape[0] <= SMALL_M:
            y = _int8_gemv(x2.contiguous(), self.qweight, self.scale, self.bias)
        else:
            y = F.linear(x2, dequantize(self.qweight, self.scale, 8, x.dtype), self.bias)
        return y.reshape(*shape[:-1], -1)


# -- int4 ------------------------------------------------------------------------------------------
def group_size(in_features: int) -> int:
    """The largest group size tinygemm takes (128, 64 or 32) that divides the input width."""
    for group in (GROUP, 64, 32):
        if in_features % group == 0:
            return group
    raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")


def quantize_int4_groups(weight: torch.Tensor, group: int):
    """[N, K] float -> (q [N, K] uint8 in 0..15, scales_and_zeros [K/group, N, 2] bf16)."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group, group)
    low, high = w.amin(-1), w.amax(-1)                                # [N, K/group]
    scale = ((high - low) / 15).clamp(min=1e-6)
    zero = low + 8 * scale
    q = ((w - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def dequantize_int4_groups(q: torch.Tensor, scales_and_zeros: torch.Tensor, dtype) -> torch.Tensor:
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)                     # [N, K/group, 2]
    w = (q.float().reshape(N, sz.shape[1], -1) - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(N, K).to(dtype)


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        self.group = group_size(weight.shape[1])
        q, sz = quantize_int4_groups(weight, self.group)
        self.register_buffer("scales_and_zeros", sz)
        self.cuda_kernel = weight.is_cuda
        if self.cuda_kernel:
            packed = (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()          # [N, K/2] uint8, even index high
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack(packed, INNER_K_TILES))
        else:
            self.register_buffer("qweight", q)
        self.bias = bias

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.cuda_kernel:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.group,
                                                   self.scales_and_zeros).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, dequantize_int4_groups(self.qweight, self.scales_and_zeros, x.dtype), self.bias)
        return y.reshape(*shape[:-1], -1)


# -- rewriting a model --------------------------------------------------------------------------------
LAYERS = {8: Int8Linear, 4: Int4Linear}


def quantize_glm(glm, bits: int, release=None, device=None) -> None:
    """Replace the linears of every GLM block and the LM head of `glm` (a FastGLM) by `bits`-bit layers.
    release(weight) is called for each float weight once it is quantized, so a caller can free it
    (the float tensors belong to the loaded model, which may still need them).
    device: quantize onto this device: one float weight at a time is copied there, quantized, and the
    copy dropped before the next, so the device never holds more than one float matrix (a model loaded
    on the CPU reaches the GPU quantized). Biases stay where they are (the caller moves the model)."""
    if bits not in LAYERS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    make = LAYERS[bits]

    def swap(owner, name):
        old = getattr(owner, name)
        weight = old.weight if device is None else old.weight.to(device)     # [N, K] float, one at a time
        setattr(owner, name, make(weight, old.bias))
        del weight
        if release is not None:
            release(old.weight)
    for block in glm.blocks:
        for name in ("qkv", "dense", "up", "down"):
            swap(block, name)
    swap(glm, "lm_head")
