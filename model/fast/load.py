"""--quant on the fast path: which path quantizes a checkpoint, and the quantized FastBackend built from a
model loaded on the CPU (model/sat/loading.py calls both; the front ends' flags stay as they are).

On a GPU with --backend auto or fast, the fast path quantizes: the checkpoint is read on the CPU, then
each GLM weight matrix is copied to the GPU, quantized there and dropped (its CPU copy freed too), and
the rest of the model follows, so the GPU never holds the float GLM and peak GPU memory is about the
quantized model. Elsewhere (the CPU, --backend sat, and with auto a model whose adapters the fast path
cannot run) sat's quantization (model/sat/quantization.py) does it, as before.
"""
from ..backend import FAST_MIXINS, _fast_backends
from .backend import FastBackend


def fast_quantizes(device, backend, quant, mixins=()) -> bool:
    """Whether --quant `quant` is done by the fast path for this device and --backend choice. mixins:
    the loaded model's mixin names (with "auto", LoRA or P-tuning models stay on sat's path)."""
    if not quant or backend not in ("auto", "fast") or not str(device).startswith("cuda"):
        return False
    return backend == "fast" or set(mixins) <= FAST_MIXINS


def quantize_onto(model, bits: int, device) -> FastBackend:
    """Quantize the GLM of `model` (loaded on the CPU) onto `device` and move the rest of it there. The
    returned backend is the model's from now on: ChatEngine(model, backend="auto" or "fast") uses it.
    The model's own GLM weights are released (the sat path can no longer run it)."""
    backend = FastBackend(model, quant=bits, device=device)
    _fast_backends[model] = backend                  # as_backend's one-per-model table
    return backend
