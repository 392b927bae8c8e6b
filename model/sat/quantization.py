"""Weight-only int8 / int4 quantization of sat linear layers, in pure torch (CPU and CUDA).

This replaces `sat.quantization.kernels.quantize`, which needs CUDA and cpm_kernels even to quantize
(see shared/notes/sat-0.4.12-on-cpu.md section 3). The numeric scheme is the one of the spec (7.2):

* per output row ``scale = max|W_row| / (2**(bits-1) - 1)`` (127 for int8, 7 for int4);
* ``q = round(W / scale)`` stored as int8; for int4 two values share one byte,
  ``byte j = (q[2j] << 4) | (q[2j+1] & 0xF)`` (high nibble, sign-extended, is element 2j;
  low nibble is element 2j+1), so ``weight`` is int8 ``[out, in]`` (int8) or ``[out, in/2]`` (int4);
* forward: dequantize ``q * scale`` row by row to the activation dtype, then a dense matmul, then bias.

State dict of a quantized layer: ``weight`` (int8, packed for int4), ``weight_scale`` ([out]) and
``bias`` (if the layer had one), the key layout of HF ChatGLM's quantized checkpoints. ``weight`` and
``weight_scale`` are *buffers*, not parameters: they are never trained, ``model.requires_grad_()``
stays valid, and sat code that takes its dtype from ``next(model.parameters())`` (e.g.
``ChatGLMModel.get_masks``; ``lm_head`` is the first parameter of a ChatGLMModel) still sees a float.

dtype of ``weight_scale``: the dtype of the float weight that was quantized (fp16 for the usual fp16 GPU
model, as in the original; fp32 when a fp32 CPU model is quantized, so nothing is lost to an extra
fp16 rounding). ``model.half()`` later converts it like any float buffer.

The dequantize + matmul lives in one module-level function, `_linear_forward`, looked up at call time,
so that a faster kernel can replace it later without touching the modules.

What is not supported: sat's model-parallel re-splitting (`mp_split_model`) of an already quantized
model (quantize after splitting: each rank then quantizes its own shard), and sat's `LoraMixin.reinit`
on a quantized layer (sat's lora2 looks the layer type up in a fixed table). Apply LoRA first: the
float `original` linear inside a `LoraLinear` is then what gets quantized (gradients reach the LoRA
matrices through `_linear_forward`); sat's `merge_lora` cannot merge into it, use `dequantize_weight`.

Loading: quantize a model whose weights are real, or pass ``empty_init=True`` (for uninitialised
``skip_init`` or meta-device models) and then ``load_state_dict`` a quantized state dict, or a float
one, which QuantizedLinear quantizes while loading (with ``assign=True`` on a meta model).
Quantizing uninitialised memory is refused when it holds inf/NaN.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import SUPPORTED_BITS, _check_bits, dequantize, pack_int4, quantize_weight, unpack_int4  # noqa: F401
from . import compat as _compat

_compat.import_sat()
from sat.mpu import (  # noqa: E402  (sat must be imported through compat first)
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from sat.mpu.initialize import get_model_parallel_world_size  # noqa: E402
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedLinear",
    "quantize",
    "quantize_weight",
    "dequantize",
    "dequantize_weight",
    "pack_int4",
    "unpack_int4",
]

logger = logging.getLogger(__name__)

_TARGETS = ("glm", "all")
_PROGRESS_THRESHOLD = 50  # show a progress bar when more layers than this are quantized


class _WeightOnlyMatmul(torch.autograd.Function):
    """x @ dequant(W).T whose backward re-dequantizes instead of keeping the float weight alive
    (gradient flows to the input only, e.g. for LoRA / prefix training over a quantized base)."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bits):
        ctx.bits = bits
        ctx.save_for_backward(qweight, scale)
        return F.linear(x, dequantize(qweight, scale, bits, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(dequantize(qweight, scale, ctx.bits, grad_out.dtype))
        return grad_x, None, None, None


def _linear_forward(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ dequant(qweight, scale).T + bias`` — the single compute entry point of QuantizedLinear.

    Pure torch for now; a fused dequant-matmul kernel can replace this function (module attribute,
    looked up at call time). The result has ``x``'s dtype.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        out = _WeightOnlyMatmul.apply(x, qweight, scale, bits)
    else:
        out = F.linear(x, dequantize(qweight, scale, bits, x.dtype))
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Drop-in replacement for sat's ColumnParallelLinear / RowParallelLinear and nn.Linear.

    ``parallel`` is ``'column'``, ``'row'`` or ``'none'`` (plain nn.Linear) and selects the sat
    model-parallel communication around the matmul, exactly as the float layer did. The attributes sat
    exposes on the original layer are kept (``input_size``, ``output_size``, ``stride``,
    ``gather_output``, ``output_size_per_partition`` / ``input_is_parallel``, ``final_bias``,
    ``input_size_per_partition``; ``in_features`` / ``out_features`` for all kinds). ``in_features`` and
    ``out_features`` are the local (per model-parallel rank) shape of the float weight.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float16, device=None, parallel: str = "none",
                 input_size: Optional[int] = None, output_size: Optional[int] = None,
                 stride=1, gather_output: bool = True, input_is_parallel: bool = False,
                 final_bias: bool = True):
        super().__init__()
        _check_bits(bits)
        if parallel not in ("column", "row", "none"):
            raise ValueError(f"parallel must be 'column', 'row' or 'none', got {parallel!r}")
        if bits == 4 and in_features % 2 != 0:
            raise ValueError(f"int4 quantization needs an even number of input features, "
                             f"got in_features={in_features}")
        self.bits = bits
        self.parallel = parallel
        self.in_features = in_features
        self.out_features = out_features
        if parallel in ("column", "row"):  # the sizes sat's parallel linears expose (full, not per partition)
            self.input_size = in_features if input_size is None else input_size
            self.output_size = out_features if output_size is None else output_size
        if parallel == "column":
            self.output_size_per_partition = out_features
            self.stride = stride
            self.gather_output = gather_output
        elif parallel == "row":
            self.input_size_per_partition = in_features
            self.input_is_parallel = input_is_parallel
            self.final_bias = final_bias
        packed_in = in_features * bits // 8
        self.register_buffer("weight", torch.zeros(out_features, packed_in, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def weight_bit_width(self) -> int:  # the attribute name sat's quantized layers use
        return self.bits

    @classmethod
    def from_float(cls, linear: nn.Module, bits: int, *, empty_init: bool = False) -> "QuantizedLinear":
        """Build from a ColumnParallelLinear, RowParallelLinear or nn.Linear, quantizing its weight on
        the device it is on. The bias Parameter object is reused as is. With ``empty_init`` the weight is
        not read (it may be uninitialised or on the meta device); load a quantized state dict after."""
        _check_bits(bits)
        weight = linear.weight
        out_features, in_features = weight.shape
        kwargs = dict(dtype=weight.dtype, device=weight.device)
        if isinstance(linear, ColumnParallelLinear):
            kwargs.update(parallel="column", input_size=linear.input_size, output_size=linear.output_size,
                          stride=linear.stride, gather_output=linear.gather_output)
        elif isinstance(linear, RowParallelLinear):
            kwargs.update(parallel="row", input_size=linear.input_size, output_size=linear.output_size,
                          input_is_parallel=linear.input_is_parallel,
                          final_bias=getattr(linear, "final_bias", True))
        elif isinstance(linear, nn.Linear):
            kwargs.update(parallel="none")
        else:
            raise TypeError(f"cannot quantize a {type(linear).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"{type(linear).__name__} weight has dtype {weight.dtype}; only float weights "
                            f"can be quantized")
        if bits == 4 and in_features % 2 != 0:
            raise ValueError(f"int4 quantization packs two values per byte and needs an even number of "
                             f"input features, got in_features={in_features}")
        if weight.is_meta and not empty_init:
            raise ValueError("cannot quantize a layer whose weight is on the meta device: load or "
                             "materialize the weights first (or quantize with empty_init=True and load a "
                             "quantized state dict)")
        has_bias = getattr(linear, "bias", None) is not None
        # Build on the meta device: the real buffers are assigned right below (no double allocation).
        layer = cls(in_features, out_features, bits, bias=False, dtype=weight.dtype, device="meta",
                    **{k: v for k, v in kwargs.items() if k not in ("dtype", "device")})
        if empty_init:
            qweight = torch.zeros(out_features, in_features * bits // 8, dtype=torch.int8, device=weight.device)
            scale = torch.zeros(out_features, dtype=weight.dtype, device=weight.device)
        else:
            qweight, scale = quantize_weight(weight, bits)
        layer.weight = qweight
        layer.weight_scale = scale
        if has_bias:
            layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel == "column":
            x = copy_to_model_parallel_region(x)
            out = _linear_forward(x, self.weight, self.weight_scale, self.bits, self.bias)
            if self.gather_output:
                out = gather_from_model_parallel_region(out)
            return out
        if self.parallel == "row":
            if not self.input_is_parallel:
                x = scatter_to_model_parallel_region(x)
            if self.final_bias or self.bias is None:
                out = _linear_forward(x, self.weight, self.weight_scale, self.bits)
            else:
                out = _linear_forward(x, self.weight, self.weight_scale, self.bits,
                                      self.bias / get_model_parallel_world_size())
            out = reduce_from_model_parallel_region(out)
            if self.final_bias and self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out
        return _linear_forward(x, self.weight, self.weight_scale, self.bits, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A float checkpoint (weight [out, in] float, no weight_scale) is quantized while loading, so a
        # model can be built, quantized empty (empty_init=True) and then filled from a float checkpoint.
        w = state_dict.get(prefix + "weight")
        if (w is not None and prefix + "weight_scale" not in state_dict and torch.is_tensor(w)
                and w.is_floating_point()):
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: float weight of shape "
                                  f"{tuple(w.shape)} for a quantized layer of float shape "
                                  f"{(self.out_features, self.in_features)}")
                return
            if not self.weight.is_meta:
                w = w.to(self.weight.device)
            q, s = quantize_weight(w, self.bits)
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
            state_dict[prefix + "weight"] = q
            state_dict[prefix + "weight_scale"] = s
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, parallel={self.parallel}, "
                f"scale_dtype={self.weight_scale.dtype}")


def dequantize_weight(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float ``[out, in]`` weight a layer computes with (a new tensor, no autograd).

    For a QuantizedLinear: ``q * scale`` in ``dtype`` (default: the dtype of ``weight_scale``). For an
    ordinary float linear: a detached copy of its weight (cast to ``dtype`` if given), so LoRA merging
    can call this on quantized and float bases alike."""
    if isinstance(layer, QuantizedLinear):
        return dequantize(layer.weight, layer.weight_scale, layer.bits, dtype)
    weight = getattr(layer, "weight", None)
    if torch.is_tensor(weight) and weight.is_floating_point():
        w = weight.detach().clone()
        return w if dtype is None else w.to(dtype)
    raise TypeError(f"{type(layer).__name__} has no float or quantized weight")


# ----------------------------------------------------------------------------------------------------
# model-level entry point
# ----------------------------------------------------------------------------------------------------
def _is_target(module: nn.Module, include_nn_linear: bool) -> bool:
    if isinstance(module, QuantizedLinear):
        return False
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        return True
    return include_nn_linear and isinstance(module, nn.Linear)


def _collect(scope: nn.Module, bits: int, include_nn_linear: bool, scope_name: str
             ) -> List[Tuple[str, nn.Module, List[Tuple[nn.Module, str]]]]:
    """All target linears under scope (without descending into them), each with every (parent, attr)
    place it is registered at (a shared module is quantized once and stays shared).

    Iterative on purpose: a recursive closure would form a reference cycle that keeps every float
    layer alive until the next garbage collection, doubling peak memory during quantization."""
    found: Dict[int, Tuple[str, nn.Module, List[Tuple[nn.Module, str]]]] = {}
    visited = {id(scope)}
    stack = [(scope, scope_name)]
    while stack:
        module, path = stack.pop()
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, QuantizedLinear):
                if child.bits != bits:
                    raise ValueError(f"{child_path} is already quantized to {child.bits} bits; "
                                     f"cannot re-quantize to {bits}")
            elif _is_target(child, include_nn_linear):
                entry = found.setdefault(id(child), (child_path, child, []))
                entry[2].append((module, name))
            elif id(child) not in visited:
                visited.add(id(child))
                stack.append((child, child_path))
    jobs = list(found.values())
    found.clear()
    return jobs


def quantize(model: nn.Module, bits: int, *, targets: str = "glm", include_nn_linear: bool = False,
             empty_init: bool = False, progress: Optional[bool] = None) -> nn.Module:
    """Quantize the linear layers of ``model`` in place to ``bits`` (8 or 4); returns ``model``.

    ``targets='glm'`` (default): only ``model.transformer`` — for ChatGLM / VisualGLM the GLM block
    linears (query_key_value, dense, dense_h_to_4h, dense_4h_to_h); like the original
    ``quantize(model.transformer, bits)``. If the module has no ``transformer`` child (a bare module, or
    ``model.transformer`` itself was passed) the module itself is the scope.
    ``targets='all'``: the whole module tree, i.e. also ``lm_head`` of the ``chatglm-final`` mixin and
    the vision tower inside mixins; like the original ``quantize(model, bits)``.

    sat ColumnParallelLinear / RowParallelLinear (and subclasses) are replaced; plain ``nn.Linear``
    (e.g. ``glm_proj``) only with ``include_nn_linear=True``. Each weight is quantized on the device it
    is on; the float weight is released as soon as its layer is replaced (unless referenced elsewhere).
    ``empty_init=True`` skips reading the weights (zeros instead; allowed on the meta device), for
    loading a quantized — or float, which is then quantized on load — state dict afterwards.
    ``progress``: tqdm bar over layers; default: shown when more than 50 layers are quantized.
    Already quantized layers (same bits) are left alone, so calling this twice is harmless.
    """
    _check_bits(bits)
    if targets not in _TARGETS:
        raise ValueError(f"targets must be one of {_TARGETS}, got {targets!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    scope, scope_name = model, ""
    if targets == "glm":
        inner = getattr(model, "transformer", None)
        if isinstance(inner, nn.Module):
            scope, scope_name = inner, "transformer"

    jobs = _collect(scope, bits, include_nn_linear, scope_name)
    # Validate everything before replacing anything, so a failure leaves the model untouched.
    for path, module, _ in jobs:
        w = module.weight
        if not w.is_floating_point():
            raise TypeError(f"{path}: weight dtype {w.dtype} is not floating point (quantized by another "
                            f"scheme?)")
        if bits == 4 and w.shape[1] % 2 != 0:
            raise ValueError(f"{path}: int4 quantization packs two values per byte and needs an even "
                             f"number of input features, got in_features={w.shape[1]}")
        if w.is_meta and not empty_init:
            raise ValueError(f"{path}: weight is on the meta device; load or materialize the weights "
                             f"first (or pass empty_init=True and load a quantized state dict)")
    w = module = None  # keep no reference to a float layer beyond its replacement

    show = len(jobs) > _PROGRESS_THRESHOLD if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=f"int{bits} quantization", unit="layer")
    n_weights = 0
    used_cuda = False
    for i in range(len(jobs)):
        path, module, places = jobs[i]
        jobs[i] = None  # drop our reference so the float weight can be freed right after replacement
        used_cuda = used_cuda or module.weight.is_cuda
        n_weights += module.weight.numel()
        new = QuantizedLinear.from_float(module, bits, empty_init=empty_init)
        for parent, name in places:
            setattr(parent, name, new)
        del module, places, new
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if used_cuda and torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("quantized %d linear layers (%d weights) to int%d", len(jobs), n_weights, bits)
    return model
