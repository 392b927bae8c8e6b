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
from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch


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


def as_backend(model) -> Backend:
    """A backend as it is, or a loaded model wrapped in its backend (a thin, stateless wrapper). Only a
    sat model exists today; its wrapper is imported on demand so that the core never imports sat."""
    if is_backend(model):
        return model
    from .sat.backend import SatBackend      # a sat model can only exist where sat is installed
    return SatBackend(model)
