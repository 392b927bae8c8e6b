"""Weight-only int8 / int4 layers for the fast path, and quantize_glm(), which swaps them into a FastGLM.

int8  per output row, symmetric (the scheme of model/quant.py). On CUDA, inputs of at most SMALL_M rows
      (decoding) go through a Triton GEMV (kernels.py) that reads each int8 weight once (half the bytes of
      fp16) and applies the row scale at the end. Larger inputs (prefill) dequantize and matmul.
int4  per group of GROUP input columns (fewer for narrow layers), asymmetric: w ~ (q - 8) * scale + zero with q in [0, 15], the
      layout of torch's tinygemm kernel. On CUDA the weight is packed by aten._convert_weight_to_int4pack
      and multiplied by aten._weight_int4pack_mm (bf16 activations); elsewhere the same values are
      dequantized and multiplied, so the CPU path computes the same function. (Triton int4 GEMVs were tried
      twice on an H200: 2.6x, then, redesigned, 1.3x slower than tinygemm; see docs/benchmarks.md.)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import dequantize, quantize_weight
from . import kernels                 # imports no Triton until a kernel is first run

GROUP = 128            # int4: input columns per (scale, zero)
INNER_K_TILES = 8      # int4: tinygemm's packing parameter
SMALL_M = 16           # int8: rows of input that still take the Triton GEMV kernel


# -- int8 ------------------------------------------------------------------------------------------
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
            # an opaque op inside a compiled step (inductor's own fusion of int8 -> matmul measured slower)
            y = kernels.gemv_op(x2.contiguous(), self.qweight, self.scale, self.bias)
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
            self.register_buffer("qweight", q)                              # [N, K] uint8
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
