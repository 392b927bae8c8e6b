"""The backend interface: what the chat core needs from a model implementation.

The chat core (prompts, sampling, the decoding loop, image handling, the engine) drives a model only
through these calls, so the sat model, a Hugging Face model or a fast static-cache GPU path can each
sit behind it:

    backend.encode_image(pixels)                 pixels [B, 3, H, W] (normalised) -> [B, L, hidden]
    backend.prefill(ids, positions, mask, image_embeds, pre_image, capacity) -> (logits [B, V] fp32, cache)
    backend.decode_step(tokens, positions, key_mask, cache)        -> (logits [B, V] fp32, cache)

with ids [B, S] (left-padded), positions [B, 2, S] (GLM 2-D ids), mask [B, 1, S, S] (bool, True = may
attend), image_embeds [B, L, hidden] or None, pre_image [B] (index of the first image slot, -1: none),
tokens [B, 1], key_mask [B, T] (bool, which cached positions are real tokens), capacity the most tokens
(prompt + answer) a row may reach, for backends that preallocate. `cache` is whatever the backend keeps
between steps; the core only hands it back.
"""
import weakref
from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch

from .defaults import BACKENDS


@runtime_checkable
class Backend(Protocol):
    image_size: Tuple[int, int]          # (H, W) of the pixels encode_image takes
    image_length: int                    # image slots in a prompt (32 for VisualGLM-6B)
    max_sequence_length: int             # prompt + answer tokens the model takes
    device: torch.device

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                image_embeds: Optional[torch.Tensor] = None,
                pre_image: Optional[torch.Tensor] = None, capacity: Optional[int] = None) -> Tuple[torch.Tensor, Any]: ...

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                    cache: Any) -> Tuple[torch.Tensor, Any]: ...


def is_backend(obj) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("encode_image", "prefill", "decode_step"))


_fast_backends: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # one per loaded model


def as_backend(model, kind: str = "auto") -> Backend:
    """A backend as it is, or a loaded model wrapped in one. kind "sat": the reference path (sat's own
    forward); "fast": model/fast (static cache, compiled CUDA-graph decoding; built once per model and
    kept, since compiling and capturing take seconds); "auto": fast on a GPU when the model's GLM is
    plain float (a model quantized by model/sat/quantization stays on the sat path), sat otherwise.
    The wrappers are imported on demand, so that the core never imports sat."""
    if kind not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {kind!r}")
    if is_backend(model):
        return model
    if kind == "fast" or (kind == "auto" and _fast_suits(model)):
        if model not in _fast_backends:
            from .fast import FastBackend
            _fast_backends[model] = FastBackend(model)
        return _fast_backends[model]
    from .sat.backend import SatBackend      # a sat model can only exist where sat is installed
    return SatBackend(model)


def open_slots(backend, max_batch: int, memory_fraction: float = 0.9):
    """Key/value slots for continuous batching (model/continuous.py) over `backend`: up to max_batch
    sequences of the model's full length, fewer if that would take the process past memory_fraction of
    the GPU's memory. None for backends that cannot batch continuously (sat, Hugging Face). On CUDA,
    every decode and image-encoder graph is captured here (FastSlots.warm_up), before any request."""
    from .fast import FastBackend
    if not isinstance(backend, FastBackend):
        return None
    from .fast.slots import FastSlots
    slots = FastSlots.sized(backend, max_batch, memory_fraction)
    slots.warm_up()
    return slots


# The fast path reproduces these mixins (spec 3) and ignores sat's cached-autoregressive one, which only
# matters to sat's own generation; P-tuning prefixes or LoRA layers would be lost, so such models stay on sat.
FAST_MIXINS = {"chatglm-final", "chatglm-attn", "chatglm-layer", "eva", "auto-regressive"}


def _fast_suits(model) -> bool:
    first = model.transformer.layers[0].attention.query_key_value
    return (next(model.parameters()).is_cuda and set(getattr(model, "mixins", {})) <= FAST_MIXINS
            and isinstance(getattr(first, "weight", None), torch.nn.Parameter))
