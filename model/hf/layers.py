"""The transformer pieces of the Hugging Face flavour in plain torch, with the parameter names of the
released checkpoints (spec 1.4 / 2.3): every block has `input_layernorm`, `attention.query_key_value`,
`attention.dense`, `post_attention_layernorm`, `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h`, and the
Q-Former's cross-attention blocks `cross_attention.{query,key_value,dense}` and
`post_cross_attention_layernorm`.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def attend(q, k, v, masked: Optional[torch.Tensor] = None):
    """q [B, nh, S, hd], k/v [B, nh, T, hd], masked [B, 1, S, T] bool (True = may NOT attend) ->
    [B, S, nh*hd]. Masked scores are set to -10000 (spec 3.3), softmax in fp32. Without a mask (the ViT
    and the Q-Former) through scaled_dot_product_attention, which also takes the softmax in fp32 but never
    writes the [B, nh, S, T] scores out (the image encoder's attention was a third of its time on an H200)."""
    if masked is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))          # [B, nh, S, T]
    scores = scores.masked_fill(masked, -10000.0)
    probs = scores.float().softmax(-1).to(v.dtype)
    out = torch.matmul(probs, v)                                                      # [B, nh, S, hd]
    return out.transpose(1, 2).flatten(2)


def split_heads(x, heads: int):
    """[B, S, heads*hd] -> [B, heads, S, hd]"""
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, approximate: str, dtype=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, inner, dtype=dtype)
        self.dense_4h_to_h = nn.Linear(inner, hidden, dtype=dtype)
        self.approximate = approximate          # "tanh" (GLM) or "none" (EVA, Q-Former: erf GELU)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class SelfAttention(nn.Module):
    """Bidirectional attention with contiguous [Q | K | V] rows (EVA ViT, Q-Former)."""

    def __init__(self, hidden: int, heads: int, dtype=None):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden, dtype=dtype)
        self.dense = nn.Linear(hidden, hidden, dtype=dtype)

    def forward(self, x):                                                             # [B, S, H]
        q, k, v = (split_heads(t, self.heads) for t in self.query_key_value(x).chunk(3, -1))
        return self.dense(attend(q, k, v))


class CrossAttention(nn.Module):
    """Queries from the Q-Former, keys and values ([K | V] rows) from the image encoder."""

    def __init__(self, hidden: int, heads: int, encoder_hidden: int, dtype=None):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden, dtype=dtype)
        self.key_value = nn.Linear(encoder_hidden, 2 * hidden, dtype=dtype)
        self.dense = nn.Linear(hidden, hidden, dtype=dtype)

    def forward(self, x, encoder):                                  # x [B, S, H], encoder [B, T, He]
        q = split_heads(self.query(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.key_value(encoder).chunk(2, -1))
        return self.dense(attend(q, k, v))


class EncoderBlock(nn.Module):
    """A sat-style block in "pre" or "post" LayerNorm order, optionally with cross-attention
    (spec 4.2 / 4.3). pre:  x += attn(LN1 x); x += cross(LNc x); x += mlp(LN2 x)
                     post: a = LN1 x; m = LN2(a + attn a); m = LNc(m + cross m); out = m + mlp m"""

    def __init__(self, args: dict, cross_hidden: Optional[int] = None, dtype=None):
        super().__init__()
        H, heads, eps = args["hidden_size"], args["num_attention_heads"], args.get("layernorm_epsilon", 1e-5)
        self.order = args.get("layernorm_order", "pre")
        if self.order not in ("pre", "post"):
            raise ValueError(f"layernorm_order {self.order!r} is not supported (pre or post)")
        self.input_layernorm = nn.LayerNorm(H, eps=eps, dtype=dtype)
        self.attention = SelfAttention(H, heads, dtype=dtype)
        self.post_attention_layernorm = nn.LayerNorm(H, eps=eps, dtype=dtype)
        if cross_hidden is not None:
            self.cross_attention = CrossAttention(H, heads, cross_hidden, dtype=dtype)
            self.post_cross_attention_layernorm = nn.LayerNorm(H, eps=eps, dtype=dtype)
        self.mlp = MLP(H, args.get("inner_hidden_size") or 4 * H, "none", dtype=dtype)

    def forward(self, x, encoder=None):
        cross = hasattr(self, "cross_attention") and encoder is not None
        if self.order == "pre":
            x = x + self.attention(self.input_layernorm(x))
            if cross:
                x = x + self.cross_attention(self.post_cross_attention_layernorm(x), encoder)
            return x + self.mlp(self.post_attention_layernorm(x))
        a = self.input_layernorm(x)
        m = self.post_attention_layernorm(a + self.attention(a))
        if cross:
            m = self.post_cross_attention_layernorm(m + self.cross_attention(m, encoder))
        return m + self.mlp(m)
