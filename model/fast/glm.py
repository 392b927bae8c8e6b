"""The GLM decoder of VisualGLM-6B in plain torch, for fast inference.

It is built from a loaded model and shares its weight tensors (no second copy). Same maths as sat's
ChatGLM (spec 3): post-LN with the residual scaled by alpha = sqrt(2 * layers), GPT-NeoX rotary
embeddings applied separately to the two halves of each head (position ids on the first half, block
position ids on the second), GELU (tanh), a final LayerNorm and an untied LM head. Differences are in
the mechanics only: a static key/value cache written by index, and attention through
scaled_dot_product_attention with a boolean mask (the GLM prefix mask: bidirectional over the prompt,
causal after it).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache


class Linear(nn.Module):
    """y = x W^T + b over existing tensors; quantized variants replace it (model/fast/quant.py)."""

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def linear_of(module) -> Linear:
    """Our Linear sharing a loaded layer's tensors (a plain or sat parallel linear of one partition)."""
    return Linear(module.weight, module.bias)


def rotary_table(positions: int, dim: int, dtype, device):
    """cos, sin [positions, dim] of GPT-NeoX rotary embeddings over `dim` channels (base 10000)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(u, cos, sin):
    """u [B, S, nh, d]; cos / sin [B, S, 1, d]: pairs (i, i + d/2) rotated."""
    half = u.shape[-1] // 2
    return u * cos + torch.cat([-u[..., half:], u[..., :half]], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, layer, alpha: float, heads: int):
        super().__init__()
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv, self.dense = linear_of(layer.attention.query_key_value), linear_of(layer.attention.dense)
        self.up, self.down = linear_of(layer.mlp.dense_h_to_4h), linear_of(layer.mlp.dense_4h_to_h)
        self.alpha, self.heads = alpha, heads

    def forward(self, x, rope, cache: KVCache, index: int, slots, mask):
        B, S, H = x.shape
        a = self.ln1(x)
        q, k, v = self.qkv(a).view(B, S, 3, self.heads, -1).unbind(2)           # [B, S, nh, hd] each
        q, k = (torch.cat([rotate(t[..., :t.shape[-1] // 2], *rope[0]), rotate(t[..., t.shape[-1] // 2:], *rope[1])],
                          dim=-1) for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                          # [B, nh, S, hd]
        keys, values = cache.update(index, slots, k, v)                           # [B, nh, T, hd]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)    # [B, nh, S, hd]
        h = a * self.alpha + self.dense(attn.transpose(1, 2).reshape(B, S, H))
        m = self.ln2(h)
        return m * self.alpha + self.down(F.gelu(self.up(m), approximate="tanh"))


class FastGLM(nn.Module):
    def __init__(self, model):
        """model: a loaded VisualGLM (sat) model; its GLM tensors are shared, not copied."""
        super().__init__()
        t, config = model.transformer, model.config
        self.heads, self.layers_n = config["num_attention_heads"], config["num_layers"]
        self.head_dim = config["hidden_size"] // self.heads
        alpha = math.sqrt(2 * self.layers_n)
        self.embed = t.word_embeddings.weight                                      # [V, H]
        self.blocks = nn.ModuleList(Block(layer, alpha, self.heads) for layer in t.layers)
        self.final_ln = t.final_layernorm
        self.lm_head = linear_of(model.mixins["chatglm-final"].lm_head)
        self.max_positions = int(config.get("max_sequence_length", 2048))
        self._rope = None

    def rope_tables(self, dtype, device):
        if self._rope is None or self._rope[0].dtype != dtype or self._rope[0].device != torch.device(device):
            self._rope = rotary_table(self.max_positions + 1, self.head_dim // 2, dtype, device)
        return self._rope

    def embed_tokens(self, ids, image_embeds=None, pre_image=None):
        """ids [B, S] -> [B, S, H]; image_embeds [B, L, H] written over the slots from pre_image[b]
        (rows with pre_image < 0 have no image)."""
        x = F.embedding(ids, self.embed)
        if image_embeds is None:
            return x
        L = image_embeds.shape[1]
        for b, start in enumerate(pre_image.tolist()):
            if start >= 0:
                x[b, start:start + L] = image_embeds[b].to(x.dtype)
        return x

    def forward(self, x, positions, cache: KVCache, slots, mask) -> torch.Tensor:
        """x [B, S, H] embeddings, positions [B, 2, S] (GLM 2-D ids), slots [S] cache slots to write,
        mask [B, 1, S, T] bool over the cache -> logits of the last position [B, V] (fp32)."""
        cos, sin = self.rope_tables(x.dtype, x.device)
        rope = [(cos[positions[:, i]][:, :, None], sin[positions[:, i]][:, :, None]) for i in (0, 1)]  # [B, S, 1, d]
        for index, block in enumerate(self.blocks):
            x = block(x, rope, cache, index, slots, mask)
        return self.lm_head(self.final_ln(x[:, -1])).float()
