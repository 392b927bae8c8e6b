"""Weight-only quantization numerics shared by every backend (pure torch, any device).

Per output row, symmetric: ``scale = max|W_row| / (2**(bits-1) - 1)`` (127 for int8, 7 for int4),
``q = round(W / scale)``; for int4 two values share one byte, ``byte j = (q[2j] << 4) | (q[2j+1] & 0xF)``.
model/sat/quantization.py builds sat layers on these; model/fast/quant.py the fast path's layers.
"""
from typing import Optional, Tuple

import torch

SUPPORTED_BITS = (4, 8)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported quantization bit width {bits!r}: only 8 (int8) and 4 (int4, two values per "
            f"byte) are supported"
        )
    return bits


def _qmax(bits: int) -> int:
    """Largest quantized magnitude: 127 for int8, 7 for int4."""
    return 2 ** (bits - 1) - 1


# ----------------------------------------------------------------------------------------------------
# int4 nibble packing
# ----------------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] along the last dim, two per byte.

    Output byte j holds element 2j in its high nibble and element 2j+1 in its low nibble, i.e. the bit
    pattern of ``(q[2j] << 4) | (q[2j+1] & 0xF)`` truncated to 8 bits. Returns int8 ``[..., n/2]``.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects an int8 tensor, got {q.dtype}")
    n = q.shape[-1]
    if n % 2 != 0:
        raise ValueError(f"int4 packing needs an even number of values in the last dimension, got {n}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    wide = q.to(torch.int16)
    high = wide[..., 0::2] & 0xF
    low = wide[..., 1::2] & 0xF
    return ((high << 4) | low).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 ``[..., m]`` -> int8 ``[..., 2m]`` with values in [-8, 7]."""
    if packed.dtype != torch.int8:
        raise TypeError(f"unpack_int4 expects an int8 tensor, got {packed.dtype}")
    # Arithmetic right shift of a signed byte sign-extends the high nibble.
    high = torch.bitwise_right_shift(packed, 4)
    low = packed & 0x0F  # 0..15
    low = low - ((low & 0x08) << 1)  # sign-extend: 8..15 -> -8..-1
    return torch.stack((high, low), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------------
# quantize / dequantize tensors
# ----------------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float ``[out, in]`` weight per output row. Returns ``(qweight, scale)``.

    ``scale`` ([out]) has the weight's dtype; ``qweight`` is int8 ``[out, in]`` (8 bits) or the packed
    int8 ``[out, in/2]`` (4 bits). Works on the weight's device; the arithmetic is done in fp32 with the
    *stored* (possibly fp16-rounded) scale, so ``|W - q*scale| <= scale/2`` holds for the stored scale.
    A row of zeros gets scale 0 and q 0.
    """
    _check_bits(bits)
    if weight.is_meta:
        raise ValueError("cannot quantize a weight on the meta device: load or materialize the weights "
                         "first (or use quantize(..., empty_init=True) and load a quantized state dict)")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {weight.dtype}")
    if bits == 4 and weight.shape[1] % 2 != 0:
        raise ValueError(f"int4 quantization packs two values per byte and needs an even number of "
                         f"input features, got in_features={weight.shape[1]}")
    qmax = _qmax(bits)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantize a weight that contains inf or NaN")
    scale = (amax / qmax).to(weight.dtype)
    divisor = scale.float()
    divisor = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    q = torch.round(w / divisor[:, None])
    del w
    # Clamping only guards against the stored scale having been rounded down (fp16/bf16), which could
    # otherwise turn the row maximum into qmax+1; symmetric range as in the spec.
    q = q.clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, bits: int,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``q * scale`` per row, as a float ``[out, in]`` tensor in ``dtype`` (default: scale's dtype)."""
    if dtype is None:
        dtype = scale.dtype
    q = unpack_int4(qweight) if bits == 4 else qweight
    return q.to(dtype) * scale.to(dtype)[:, None]
