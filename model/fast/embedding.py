"""The word embedding table of the fast path: the loaded one as it is, or int8 under --quant.

The table of VisualGLM-6B is 130528 x 4096: 1.07 GB in fp16, a third of what the int4 GLM weighs.
Only the rows of a step's tokens are read, so storing it as int8 (per row, symmetric; model/quant.py's
scheme) costs nothing in speed and halves it; a row comes back within half a step (max|row| / 254) of
the float one.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import quantize_weight


class Embedding(nn.Module):
    """ids -> rows of an existing [V, H] tensor (shared with the loaded model, not copied)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)                   # [..., H]


class Int8Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_weight(weight, 8)                  # [V, H] int8, [V]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)                   # in the float table's dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.dtype) * self.scale[ids][..., None]   # [..., H]


def quantize_embedding(glm, release=None, device=None) -> None:
    """Make the word embedding of `glm` (a FastGLM) int8. device / release: as quantize_glm's."""
    old = glm.word
    weight = old.weight if device is None else old.weight.to(device)
    glm.word = Int8Embedding(weight)
    del weight
    if release is not None:
        release(old.weight)
