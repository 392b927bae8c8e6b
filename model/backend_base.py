"""The part of a backend that wraps a loaded VisualGLM model, shared by the sat and fast backends (its
own module so that model/backend.py, which picks between them, does not import in a circle)."""
from typing import Any, Tuple

import torch


class LoadedModelBackend:
    """What every backend wrapping a loaded VisualGLM model (`self.model`) reads from it the same way:
    the sizes, and the image encoder (EVA ViT + Q-Former + projection), which runs as the model has it."""
    model: Any
    device: torch.device

    @property
    def image_size(self) -> Tuple[int, int]:
        return self.model.image_size

    @property
    def image_length(self) -> int:
        return self.model.image_length

    @property
    def max_sequence_length(self) -> int:
        return int(self.model.config.get("max_sequence_length", 2048))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device))          # [B, L, hidden]
