"""The image encoder of the Hugging Face flavour (spec 4), plain torch, under `image_encoder.`:

    pixels [B, 3, 224, 224]
      -> vit        [B, 257, 1408]  patch conv + CLS + positions, pre-LN blocks, then mixins.cls.ln_vision
      -> qformer    [B, 32, 768]    learned queries, cross-attention to the ViT output, final_layernorm
      -> glm_proj   [B, 32, 4096]

Module paths copy the sat names after `mixins.eva.model.` (spec 2.3), so the keys are
image_encoder.vit.mixins.patch_embedding.proj.weight, image_encoder.vit.transformer.layers.0...,
image_encoder.qformer.transformer.final_layernorm.weight, image_encoder.glm_proj.weight, ...
Sizes above are the released model's; all come from eva_config / qformer_config.
"""
import torch
import torch.nn as nn

from .layers import EncoderBlock


class _Holder(nn.Module):
    """A named container, only there to give the parameters their released names."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class EncoderStack(nn.Module):
    """`transformer.*` of the ViT or the Q-Former: embeddings, blocks, optional final LayerNorm."""

    def __init__(self, args: dict, positions: int, cross_hidden=None, dtype=None):
        super().__init__()
        H = args["hidden_size"]
        self.word_embeddings = nn.Embedding(args["vocab_size"], H, dtype=dtype)
        if positions:
            self.position_embeddings = nn.Embedding(positions, H, dtype=dtype)
        decoder = args.get("is_decoder") or [False] * args["num_layers"]
        if isinstance(decoder, bool):
            decoder = [decoder] * args["num_layers"]
        self.layers = nn.ModuleList(EncoderBlock(args, cross_hidden if decoder[i] else None, dtype=dtype)
                                    for i in range(args["num_layers"]))
        if args.get("use_final_layernorm", True):
            self.final_layernorm = nn.LayerNorm(H, eps=args.get("layernorm_epsilon", 1e-5), dtype=dtype)

    def forward(self, x, encoder=None):
        for layer in self.layers:
            x = layer(x, encoder)
        final = getattr(self, "final_layernorm", None)
        return final(x) if final is not None else x


class EVAViT(nn.Module):
    def __init__(self, args: dict, dtype=None):
        super().__init__()
        H, patch = args["hidden_size"], args["patch_size"]
        h, w = args["image_size"]
        self.image_size = (h, w)
        positions = args.get("pre_len", 1) + (h // patch) * (w // patch) + args.get("post_len", 0)
        self.mixins = _Holder(
            patch_embedding=_Holder(proj=nn.Conv2d(args.get("in_channels", 3), H, patch, stride=patch, dtype=dtype)),
            cls=_Holder(ln_vision=nn.LayerNorm(H, dtype=dtype)))           # torch's default eps 1e-5
        self.transformer = EncoderStack(args, positions, dtype=dtype)

    def forward(self, pixels):                                             # [B, 3, h, w]
        t = self.transformer
        patches = self.mixins.patch_embedding.proj(pixels).flatten(2).transpose(1, 2)   # [B, P, H]
        cls = t.word_embeddings.weight[:1].expand(pixels.shape[0], 1, -1)
        x = torch.cat([cls, patches], 1) + t.position_embeddings.weight                 # [B, 1 + P, H]
        return self.mixins.cls.ln_vision(t(x))


class QFormer(nn.Module):
    def __init__(self, args: dict, dtype=None):
        super().__init__()
        self.transformer = EncoderStack(args, 0, cross_hidden=args["cross_attn_hidden_size"], dtype=dtype)

    def forward(self, encoder, queries: int):                             # [B, T, He] -> [B, queries, H]
        x = self.transformer.word_embeddings.weight[:queries].expand(encoder.shape[0], -1, -1)
        return self.transformer(x, encoder)


class ImageEncoder(nn.Module):
    def __init__(self, config, dtype=None):
        super().__init__()
        q = config.qformer_config
        if q["vocab_size"] < config.image_length:
            raise ValueError(f"qformer_config.vocab_size ({q['vocab_size']}) must be at least image_length "
                             f"({config.image_length}): each image slot is one learned query")
        self.image_length = config.image_length
        self.vit = EVAViT(config.eva_config, dtype=dtype)
        self.qformer = QFormer(q, dtype=dtype)
        self.glm_proj = nn.Linear(q["hidden_size"], config.hidden_size, dtype=dtype)

    def forward(self, pixels):                                  # [B, 3, h, w] -> [B, image_length, hidden]
        dtype = self.glm_proj.weight.dtype
        return self.glm_proj(self.qformer(self.vit(pixels.to(dtype)), self.image_length))
