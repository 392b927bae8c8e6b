"""The image encoder of VisualGLM: EVA ViT -> ln_vision -> Q-Former -> glm_proj (BLIP-2 style).

    pixels [B, 3, 224, 224]
      -> EVAViT          [B, 257, 1408]  (CLS + 16x16 patches, pre-LN blocks, erf GELU, then ln_vision)
      -> QFormer         [B, 32, 768]    (32 learned queries, post-LN, cross-attention in some layers)
      -> glm_proj        [B, 32, 4096]   (the GLM's hidden size)

Sizes above are those of the released checkpoint; every size here comes from the config
(`eva_args`, `qformer_args`, `image_length`), nothing is hard-coded. Parameter names follow the
released sat checkpoint (spec section 1.4), which is why the sat model classes are used as is.
"""
import argparse

import torch
import torch.nn as nn

from sat.model.base_model import BaseMixin, BaseModel
from sat.model.official.vit_model import ViTModel

# Keys every sat BaseModel needs besides the architecture itself.
_BUILD_DEFAULTS = dict(skip_init=False, model_parallel_size=1)


def sat_args(model_cls, arch: dict, **overrides) -> argparse.Namespace:
    """Namespace for a sat model class from an architecture dict (e.g. `eva_args` of model_config.json)."""
    values = {**_BUILD_DEFAULTS, **arch, **overrides}
    return model_cls.get_args(**values)


class LNFinalMixin(BaseMixin):
    """Replaces the ViT classifier head: the EVA output goes through `ln_vision` (torch default eps)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.ln_vision = nn.LayerNorm(hidden_size)

    def final_forward(self, logits, **kw_args):
        return self.ln_vision(logits)  # [B, 257, hidden]


class EVAViT(ViTModel):
    def __init__(self, args, transformer=None, **kwargs):
        super().__init__(args, transformer=transformer, **kwargs)
        # The released checkpoint has `mixins.cls.ln_vision` where sat's ViT has a classifier.
        self.del_mixin("cls")
        self.add_mixin("cls", LNFinalMixin(args.hidden_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch = image.shape[0]
        cls_ids = torch.zeros(batch, 1, dtype=torch.long, device=image.device)  # the one "word": CLS
        positions = torch.arange(self.transformer.property.seq_len, device=image.device)[None]
        return super().forward(input_ids=cls_ids, position_ids=positions, attention_mask=None, image=image)[0]


class QFormer(BaseModel):
    """BLIP-2 Q-Former as a sat model: its 'vocabulary' is the learned query tokens."""

    def __init__(self, args, transformer=None, **kwargs):
        super().__init__(args, transformer=transformer, activation_func=nn.functional.gelu, **kwargs)
        del self.transformer.position_embeddings  # max_sequence_length is 0: queries have no positions

    def position_embedding_forward(self, position_ids, **kw_args):
        return None

    def final_forward(self, logits, **kw_args):
        return logits  # hidden states after final_layernorm; no LM head

    def forward(self, encoder_outputs: torch.Tensor, num_queries: int) -> torch.Tensor:
        batch = encoder_outputs.shape[0]
        query_ids = torch.arange(num_queries, device=encoder_outputs.device)[None].expand(batch, -1)
        ones = torch.ones(1, 1, device=encoder_outputs.device, dtype=encoder_outputs.dtype)
        return super().forward(input_ids=query_ids, position_ids=None, attention_mask=ones,
                               encoder_outputs=encoder_outputs, cross_attention_mask=ones)[0]


class BLIP2(nn.Module):
    def __init__(self, eva_args: dict, qformer_args: dict, glm_hidden_size: int, image_length: int,
                 params_dtype=torch.float32, skip_init: bool = False):
        super().__init__()
        if qformer_args["vocab_size"] < image_length:
            raise ValueError(f"qformer_args.vocab_size ({qformer_args['vocab_size']}) must be at least "
                             f"image_length ({image_length}): each image token is one learned query")
        self.image_length = image_length
        self.vit = EVAViT(sat_args(EVAViT, eva_args, skip_init=skip_init), params_dtype=params_dtype)
        self.qformer = QFormer(sat_args(QFormer, qformer_args, skip_init=skip_init), params_dtype=params_dtype)
        self.glm_proj = nn.Linear(qformer_args["hidden_size"], glm_hidden_size, dtype=params_dtype)

    @property
    def image_size(self) -> tuple:
        return tuple(self.vit.transformer.property.image_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: [B, 3, H, W] already normalised (model/image.py)
        enc = self.vit(image)                                   # [B, 1 + patches, eva_hidden]
        queries = self.qformer(enc, self.image_length)          # [B, image_length, qformer_hidden]
        return self.glm_proj(queries)                           # [B, image_length, glm_hidden]
