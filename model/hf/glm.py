"""ChatGLM-6B in the Hugging Face layout (spec 2.3 / 3), plain torch, under `transformer.`:
word_embeddings, layers.N.{input_layernorm, attention.{query_key_value, dense, rotary_emb.inv_freq},
post_attention_layernorm, mlp.*}, final_layernorm.

The only difference from the sat model's weights is the query_key_value row order: per head
[q_h; k_h; v_h] (HF, spec 1.3), where sat has [all Q | all K | all V]. The maths: post-LN blocks with
the residual on the normalised input scaled by alpha = sqrt(2 * layers), 2-D rotary (position ids on the
first half of each head, block position ids on the second, GPT-NeoX half pairing), GELU (tanh).
The cache is a transformers Cache (DynamicCache): per layer k, v [B, nh, T, hd], keys after rotary.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
from transformers.cache_utils import Cache

from ..positions import inverse_frequencies
from .layers import MLP, attend


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(dim))      # saved like upstream's, [dim / 2]

    def forward(self, u, positions):
        """u [B, S, nh, d], positions [B, S] -> u rotated. Angles computed in fp32 (the sat way)."""
        angle = positions[..., None].float() * self.inv_freq.float()            # [B, S, d/2]
        angle = torch.cat([angle, angle], -1)[:, :, None]                       # [B, S, 1, d]
        half = u.shape[-1] // 2
        rotated = torch.cat([-u[..., half:], u[..., :half]], -1)
        return u * angle.cos().to(u.dtype) + rotated * angle.sin().to(u.dtype)


class GLMAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, layer_idx: int, dtype=None):
        super().__init__()
        self.heads, self.head_dim, self.layer_idx = heads, hidden // heads, layer_idx
        self.query_key_value = nn.Linear(hidden, 3 * hidden, dtype=dtype)       # rows per head: q, k, v
        self.dense = nn.Linear(hidden, hidden, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2)

    def forward(self, x, positions, masked, cache: Optional[Cache]):
        """x [B, S, H], positions [B, 2, S], masked [B, 1, S, T] bool (True = may not attend) or None."""
        B, S, _ = x.shape
        q, k, v = self.query_key_value(x).view(B, S, self.heads, 3, self.head_dim).unbind(3)   # [B, S, nh, hd]
        half = self.head_dim // 2

        def rope(u):
            return torch.cat([self.rotary_emb(u[..., :half], positions[:, 0]),
                              self.rotary_emb(u[..., half:], positions[:, 1])], -1)
        q, k, v = rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2)            # [B, nh, S, hd]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)                                             # [B, nh, T, hd]
        return self.dense(attend(q, k, v, masked))


class GLMBlock(nn.Module):
    def __init__(self, config, layer_idx: int, dtype=None):
        super().__init__()
        H, eps = config.hidden_size, config.layernorm_epsilon
        self.alpha = math.sqrt(2 * config.num_layers)
        self.input_layernorm = nn.LayerNorm(H, eps=eps, dtype=dtype)
        self.attention = GLMAttention(H, config.num_attention_heads, layer_idx, dtype=dtype)
        self.post_attention_layernorm = nn.LayerNorm(H, eps=eps, dtype=dtype)
        self.mlp = MLP(H, config.inner_hidden_size, "tanh", dtype=dtype)

    def forward(self, x, positions, masked, cache=None):
        a = self.input_layernorm(x)
        m = self.post_attention_layernorm(self.alpha * a + self.attention(a, positions, masked, cache))
        return self.alpha * m + self.mlp(m)


class GLMTransformer(nn.Module):
    def __init__(self, config, dtype=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(GLMBlock(config, i, dtype=dtype) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=dtype)

    def forward(self, x, positions, masked, cache: Optional[Cache] = None):
        """x [B, S, H] embeddings -> hidden states [B, S, H]; the cache (if any) grows by S."""
        for layer in self.layers:
            x = layer(x, positions, masked, cache)
        return self.final_layernorm(x)
