"""The sat model behind the chat core's backend interface (model/backend.py).

sat's ChatGLM forward takes a float attention mask in the weights' dtype (1 = may attend) and returns
(logits [B, S, V], {"past_key_values": ...} per layer); the cache is the tuple of those per-layer
entries, handed back on the next step.
"""
from typing import Optional

import torch

from ..backend_base import LoadedModelBackend


class SatBackend(LoadedModelBackend):
    def __init__(self, model):
        self.model = model                          # a VisualGLMModel (or FineTuneVisualGLMModel)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.word_embeddings.weight.dtype

    def _forward(self, **kw):
        out = self.model(**kw)
        logits = out[0][:, -1].float()                                   # [B, V]
        return logits, tuple(layer["past_key_values"] for layer in out[1:])

    def prefill(self, ids, positions, mask, image_embeds: Optional[torch.Tensor] = None,
                pre_image: Optional[torch.Tensor] = None, capacity: Optional[int] = None):
        """capacity is not needed: sat's cache grows by concatenation."""
        kw = {}
        if image_embeds is not None:
            kw = dict(image_embeds=image_embeds.to(self.device), pre_image=pre_image.to(self.device))
        return self._forward(input_ids=ids, position_ids=positions, attention_mask=mask.to(self.dtype), **kw)

    def decode_step(self, tokens, positions, key_mask, cache):
        mask = key_mask[:, None, None, :].to(self.dtype)                 # [B, 1, 1, T]
        return self._forward(input_ids=tokens, position_ids=positions, attention_mask=mask,
                             past_key_values=cache)
