"""Weight-only int8 / int4 layers for the fast path, and quantize_glm(), which swaps them into a FastGLM.

int8  per output row, symmetric (the scheme of model/quant.py). On CUDA, inputs of at most SMALL_M rows
      (decoding) go through a Triton GEMV (kernels.py) that reads each int8 weight once (half the bytes of
      fp16) and applies the row scale at the end. Larger inputs (prefill) dequantize and matmul.
int4  per group of GROUP input columns (fewer for narrow layers), symmetric: w ~ (q - 8) * scale with q
      in [0, 15] and each group's scale the one of least error, eight to a 32-bit word in the layout of
      kernels_int4.py, whose Triton GEMV multiplies them on CUDA (it replaced torch's tinygemm kernel, see
      docs/benchmarks.md); elsewhere the same values are dequantized and multiplied, so the CPU path
      computes the same function.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import dequantize, quantize_weight
from . import kernels, kernels_int4  # import no Triton until a kernel is first run
from .glm import activate

GROUP = 128            # int4: input columns per scale
SMALL_M = 16           # int8: rows of input that still take the Triton GEMV kernel
SMALL_M_INT4 = 256     # int4: rows that take its GEMV (it reads the weight once per tile of 16-64 rows)


# -- int8 ------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    gelu = False                       # as glm.Linear's

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
            y = kernels.gemv_op(x2.contiguous(), self.qweight, self.scale, self.bias, self.gelu)
        else:
            y = activate(self, F.linear(x2, dequantize(self.qweight, self.scale, 8, x.dtype), self.bias))
        return y.reshape(*shape[:-1], -1)


# -- int4 ------------------------------------------------------------------------------------------
def group_size(in_features: int) -> int:
    """The largest group size (128, 64 or 32) that divides the input width."""
    for group in (GROUP, 64, 32):
        if in_features % group == 0:
            return group
    raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")


# int4 scales tried per group, as fractions of the full-range one: clipping a group's few largest weights
# often lowers its total error (N(0, 1) weights: 0.112 -> 0.101 relative, as low as with a scale and a
# zero per group, 0.100; see docs/benchmarks.md)
CLIP_RATIOS = tuple(1 - 0.025 * i for i in range(12))


def quantize_int4_groups(weight: torch.Tensor, group: int, chunk: int = 1024):
    """[N, K] float -> (q [N, K] uint8 in 0..15, scales [N, K/group] in weight's dtype), w ~ (q - 8) * scale:
    symmetric per group (no zero point, so the kernel needs no per-group sum of x). Each group takes, of
    the full-range scale (its largest weight at +7 or its smallest at -8 steps) times CLIP_RATIOS, the one
    with the least squared error. `chunk` rows at a time bound the temporary memory."""
    N, K = weight.shape
    tiny = torch.finfo(weight.dtype).tiny                                             # a scale stays > 0
    qs, scales = [], []
    for r in range(0, N, chunk):
        w = weight[r:r + chunk].detach().float().reshape(-1, K // group, group)     # [n, groups, group]
        full = torch.maximum(w.amax(-1) / 7, -w.amin(-1) / 8)                         # [n, groups]
        best = None
        for ratio in CLIP_RATIOS:
            s = (full * ratio).clamp(min=tiny).to(weight.dtype).float()              # as it will be stored
            q = (w / s[..., None]).round_().clamp_(-8, 7)
            err = (q * s[..., None] - w).square_().sum(-1)
            if best is None:
                best = [q, s, err]
            else:
                better = err < best[2]
                best = [torch.where(better[..., None], q, best[0]), torch.where(better, s, best[1]),
                        torch.minimum(err, best[2])]
        qs.append((best[0] + 8).to(torch.uint8).reshape(-1, K))
        scales.append(best[1].to(weight.dtype))
    return torch.cat(qs), torch.cat(scales)


# bits of a word holding pair p's elements 0 and 1 (triton_int4.py: both nibbles of a pair in one lop3)
SHIFTS = ((0, 16), (8, 24), (4, 20), (12, 28))


def pack_words(q: torch.Tensor, group: int) -> torch.Tensor:
    """q [N, K] uint8 in 0..15 -> [N, K/8] int32 in kernels_int4.py's layout: weight g*group + 2*(p*W + j) + e
    (W = group / 8) is element e of pair p of word g*W + j."""
    N, K = q.shape
    pairs = q.reshape(N, K // group, 4, group // 8, 2).to(torch.int32)       # [N, groups, p, j, e]
    words = torch.zeros(N, K // group, group // 8, dtype=torch.int32, device=q.device)
    for p, shifts in enumerate(SHIFTS):
        for e, shift in enumerate(shifts):
            words |= pairs[:, :, p, :, e] << shift                            # wraps into the sign bit at 28
    return words.reshape(N, K // 8)


def unpack_words(words: torch.Tensor, group: int) -> torch.Tensor:
    """pack_words' inverse: [N, K/8] int32 -> q [N, K] uint8."""
    N = words.shape[0]
    shifts = torch.tensor(SHIFTS, dtype=torch.int32, device=words.device).view(1, 1, 4, 1, 2)
    q = (words.reshape(N, -1, 1, group // 8, 1) >> shifts) & 15               # [N, groups, p, j, e]
    return q.reshape(N, -1).to(torch.uint8)


def dequantize_int4_groups(q: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """q [N, K] uint8, scales [N, K/group] -> [N, K] in dtype."""
    N, K = q.shape
    w = (q.float().reshape(N, scales.shape[1], -1) - 8) * scales.float()[..., None]
    return w.reshape(N, K).to(dtype)


class Int4Linear(nn.Module):
    """Up to SMALL_M_INT4 rows on CUDA: the Triton GEMV (kernels_int4.py), each int4 weight read once per
    tile of 16-64 rows. More rows (long prompts), or off CUDA: the weight dequantized CHUNK output rows at
    a time and multiplied, so a layer never holds more than a slice of itself in float."""
    CHUNK = 8192
    gelu = False                       # as glm.Linear's

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        self.group = group_size(weight.shape[1])
        q, scales = quantize_int4_groups(weight, self.group)
        self.register_buffer("qweight", pack_words(q, self.group))          # [N, K/8] int32
        self.register_buffer("scales", scales)                              # [N, K/group]
        self.bias = bias

    def dequantized(self, dtype, rows=slice(None)) -> torch.Tensor:
        """The weight (its output rows `rows`) as the float values the kernel computes with."""
        return dequantize_int4_groups(unpack_words(self.qweight[rows], self.group), self.scales[rows], dtype)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda and kernels_int4.AVAILABLE and x2.shape[0] <= SMALL_M_INT4:
            y = kernels_int4.gemv_op(x2.contiguous(), self.qweight, self.scales, self.bias, self.gelu)
        else:
            N = self.qweight.shape[0]
            y = activate(self, torch.cat([F.linear(x2, self.dequantized(x.dtype, slice(n, n + self.CHUNK)),
                                                   None if self.bias is None else self.bias[n:n + self.CHUNK])
                                          for n in range(0, N, self.CHUNK)], dim=-1))
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
        getattr(owner, name).gelu = old.gelu
        del weight
        if release is not None:
            release(old.weight)
    for block in glm.blocks:
        for name in ("qkv", "dense", "up", "down"):
            swap(block, name)
    swap(glm, "lm_head")
