"""HFBackend: the chat core's backend interface (model/backend.py) over VisualGLMForConditionalGeneration.

The core's mask is True = may attend; the model takes upstream's True = masked, so it is inverted
here. The cache is a transformers DynamicCache made at the prefill; the model grows it in place.
"""
from typing import Optional

import torch
from transformers import DynamicCache


class HFBackend:
    def __init__(self, model):
        self.model = model                              # a VisualGLMForConditionalGeneration

    @property
    def device(self) -> torch.device:
        return self.model.transformer.word_embeddings.weight.device

    @property
    def image_size(self):
        return self.model.image_size

    @property
    def image_length(self) -> int:
        return self.model.config.image_length

    @property
    def max_sequence_length(self) -> int:
        return self.model.config.max_sequence_length

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device))                  # [B, L, hidden]

    @torch.inference_mode()
    def _forward(self, cache, **kw):
        return self.model(cache=cache, use_cache=True, **kw).logits[:, -1].float(), cache     # [B, V], cache

    def prefill(self, ids, positions, mask, image_embeds: Optional[torch.Tensor] = None,
                pre_image: Optional[torch.Tensor] = None, capacity: Optional[int] = None):
        kw = {}
        if image_embeds is not None:
            kw = dict(image_embeds=image_embeds.to(self.device), pre_image_length=pre_image)
        return self._forward(DynamicCache(config=self.model.config), input_ids=ids.to(self.device),
                             position_ids=positions.to(self.device), attention_mask=~mask.to(self.device, torch.bool), **kw)

    def decode_step(self, tokens, positions, key_mask, cache):
        masked = ~key_mask.to(self.device, torch.bool)[:, None, None, :]       # [B, 1, 1, T]
        return self._forward(cache, input_ids=tokens.to(self.device), position_ids=positions.to(self.device),
                             attention_mask=masked)
