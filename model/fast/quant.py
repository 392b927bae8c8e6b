"""Weight-only int8 / int4 layers for the fast path, and quantize_glm(), which swaps them into a FastGLM.

int8  per output row, symmetric (the scheme of model/quant.py). On CUDA, inputs of at most SMALL_M rows
      (decoding) go through a Triton GEMV (kernels.py) that reads each int8 weight once (half the bytes of
      fp16) and applies the row scale at the end. Larger inputs (prefill) dequantize and matmul.
int4  per group of GROUP input columns (fewer for narrow layers), asymmetric: w ~ (q - 8) * scale + zero with q in [0, 15], the
      layout of torch's tinygemm kernel. On CUDA, kernel "tinygemm": the weight is packed by
      aten._convert_weight_to_int4pack and multiplied by aten._weight_int4pack_mm (bf16 activations);
      kernel "triton": two values a byte ([N, K/2], pack_int4), inputs of at most SMALL_M rows through the
      Triton int4 GEMV of kernels.py, larger ones dequantized and multiplied. Elsewhere the same values are
      dequantized and multiplied, so the CPU path computes the same function.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import dequantize, quantize_weight
from . import kernels                 # imports no Triton until a kernel is first run

GROUP = 128            # int4: input columns per (scale, zero)
INNER_K_TILES = 8      # int4: tinygemm's packing parameter
SMALL_M = 16           # rows of input that still take a Triton GEMV kernel (int8, int4 "triton")
INT4_KERNEL = "tinygemm"   # int4 on CUDA: "tinygemm" (aten._weight_int4pack_mm) or "triton" (kernels.py)


# -- int8 ------------------------------------------------------------------------------------------
@torch.compiler.disable
def _int8_gemv(x, w, scale, bias):
    """Called as it is inside a compiled step (inductor's own fusion of int8 -> matmul measured slower)."""
    return kernels.int8_gemv(x, w, scale, bias)


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


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] uint8 in 0..15 -> [N, K/2] uint8, byte j = q[2j] << 4 | q[2j+1] (a GEMV reads K in order)."""
    return (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: [N, K/2] -> [N, K]."""
    return torch.stack([packed >> 4, packed & 15], -1).reshape(packed.shape[0], -1)


@torch.compiler.disable
def _int4_gemv(x, packed, scales_and_zeros, group, bias):
    """Kept out of a compiled step, as the int8 GEMV is."""
    return kernels.int4_gemv(x, packed, scales_and_zeros, group, bias)


class Int4Linear(nn.Module):
    """kernel (CUDA only; None: INT4_KERNEL): "tinygemm" or "triton". One packed weight is kept, in the
    layout of the chosen kernel: tinygemm's on CUDA, pack_int4's for "triton", q unpacked otherwise."""

    def __init__(self, weight: torch.Tensor, bias, kernel=None):
        super().__init__()
        kernel = kernel or INT4_KERNEL
        if kernel not in ("tinygemm", "triton"):
            raise ValueError(f"int4 kernel must be 'tinygemm' or 'triton', got {kernel!r}")
        self.group = group_size(weight.shape[1])
        q, sz = quantize_int4_groups(weight, self.group)
        self.register_buffer("scales_and_zeros", sz)
        self.kernel = kernel if weight.is_cuda else "dequantize"
        if self.kernel == "tinygemm":
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack(pack_int4(q), INNER_K_TILES))
        elif self.kernel == "triton":
            self.register_buffer("qweight", pack_int4(q))       # [N, K/2] uint8
        else:
            self.register_buffer("qweight", q)                  # [N, K] uint8
        self.bias = bias

    def dequantized(self, dtype) -> torch.Tensor:
        """The weight the layer computes with, [N, K] in dtype (not for the tinygemm layout)."""
        q = unpack_int4(self.qweight) if self.kernel == "triton" else self.qweight
        return dequantize_int4_groups(q, self.scales_and_zeros, dtype)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.group,
                                                   self.scales_and_zeros).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        elif (self.kernel == "triton" and x.is_cuda and x2.shape[0] <= SMALL_M
              and x.dtype in (torch.float16, torch.bfloat16)):       # fp32 would meet tl.dot's tf32
            y = _int4_gemv(x2.contiguous(), self.qweight, self.scales_and_zeros, self.group, self.bias)
        else:
            y = F.linear(x2, self.dequantized(x.dtype), self.bias)
        return y.reshape(*shape[:-1], -1)


# -- rewriting a model --------------------------------------------------------------------------------
LAYERS = {8: Int8Linear, 4: Int4Linear}


def quantize_glm(glm, bits: int, release=None, device=None, int4_kernel=None) -> None:
    """Replace the linears of every GLM block and the LM head of `glm` (a FastGLM) by `bits`-bit layers.
    release(weight) is called for each float weight once it is quantized, so a caller can free it
    (the float tensors belong to the loaded model, which may still need them).
    device: quantize onto this device: one float weight at a time is copied there, quantized, and the
    copy dropped before the next, so the device never holds more than one float matrix (a model loaded
    on the CPU reaches the GPU quantized). Biases stay where they are (the caller moves the model).
    int4_kernel: Int4Linear's kernel, "tinygemm" or "triton" (None: INT4_KERNEL)."""
    if bits not in LAYERS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    make = LAYERS[bits] if bits == 8 else lambda w, b: Int4Linear(w, b, kernel=int4_kernel)

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
