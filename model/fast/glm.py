"""The GLM decoder of VisualGLM-6B in plain torch, for fast inference.

It is built from a loaded model and shares its weight tensors (no second copy). Same maths as sat's
ChatGLM (spec 3): post-LN with the residual scaled by alpha = sqrt(2 * layers), GPT-NeoX rotary
embeddings applied separately to the two halves of each head (position ids on the first half, block
position ids on the second), GELU (tanh), a final LayerNorm and an untied LM head. Differences are in
the mechanics only: a static key/value cache written by index, and attention through
scaled_dot_product_attention with a boolean mask (the GLM prefix mask: bidirectional over the prompt,
causal after it); batch-1 decoding on a GPU does rotary, cache write and attention in one kernel
(attention.py).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..positions import inverse_frequencies
from . import attention, kernels
from .cache import KVCache
from .embedding import Embedding


# Prompts (more than one position) skip cuDNN's attention: it builds a plan for every new shape, and a
# server's prompts come in all lengths and counts. Measured on an H200 (7.8B model, eager prefill): the
# first prompt of a new length took 1.1-1.7 s, a new count of prompts ~100 ms, against 21 ms without it.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def activate(layer, y: torch.Tensor) -> torch.Tensor:
    """The GELU (tanh) of a linear layer whose `gelu` is set, where its kernel did not apply it already."""
    return F.gelu(y, approximate="tanh") if layer.gelu else y


class Linear(nn.Module):
    """y = x W^T + b over existing tensors; quantized variants replace it (model/fast/quant.py).
    One row on a GPU (decoding at batch 1) goes through the Triton GEMV (kernels.py), faster there than
    cuBLAS at every layer shape of the 7.8B model; anything else through F.linear.
    gelu: GELU (tanh) after it; the GEMV applies it in its epilogue (one kernel fewer per layer)."""
    gelu = False

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        if x.is_cuda and x.numel() == x.shape[-1] and kernels.AVAILABLE:
            y = kernels.gemv_op(x.reshape(1, -1).contiguous(), self.weight, None, self.bias, self.gelu)  # [1, N]
            return y.view(*x.shape[:-1], -1)
        return activate(self, F.linear(x, self.weight, self.bias))


def linear_of(module) -> Linear:
    """Our Linear sharing a loaded layer's tensors (a plain or sat parallel linear of one partition)."""
    return Linear(module.weight, module.bias)


def rotary_table(positions: int, dim: int, dtype, device):
    """cos, sin [positions, dim] of GPT-NeoX rotary embeddings over `dim` channels (base 10000)."""
    freqs = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inverse_frequencies(dim, device)[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_pairs(head_dim: int, device):
    """Both halves of a head rotate on their own, pairing (i, i + d/2) within each half (d = head_dim/2).
    As one permutation of the head's channels and a sign: rotate_half of each half = u[perm] * sign."""
    d = head_dim // 2
    half = torch.arange(d, device=device)
    perm = torch.cat([(half + d // 2) % d, (half + d // 2) % d + d])
    sign = torch.where((torch.arange(head_dim, device=device) % d) < d // 2, -1.0, 1.0)
    return perm, sign


class Block(nn.Module):
    def __init__(self, layer, alpha: float, heads: int):
        super().__init__()
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv, self.dense = linear_of(layer.attention.query_key_value), linear_of(layer.attention.dense)
        self.up, self.down = linear_of(layer.mlp.dense_h_to_4h), linear_of(layer.mlp.dense_4h_to_h)
        self.up.gelu = True                                                      # GELU in up's epilogue
        self.alpha, self.heads = alpha, heads

    def forward(self, x, rope, cache: KVCache, index: int, slots, mask):
        B, S, H = x.shape
        cos, sin, perm = rope                                                      # [B, S, 1, 1, hd] x2, [hd]
        a = self.ln1(x)
        qkv = self.qkv(a)                                                          # [B, S, 3 * nh * hd]
        if attention.fits(B, S, H // self.heads, x.is_cuda):
            # rotary, cache write and attention in one kernel (attention.py)
            keys, values, at = cache.decode_target(index, slots)
            attn = attention.decode_attention_op(qkv.view(B, -1), cos.view(B, -1), sin.view(B, -1), perm, keys, values,
                                                 mask.view(B, -1), at)             # [B, nh, 1, hd]
        else:
            qkv = qkv.view(B, S, 3, self.heads, -1)                                # [B, S, 3, nh, hd]
            qk = qkv[:, :, :2]
            qk = qk * cos + qk[..., perm] * sin                                    # q and k rotated together
            q, k, v = (t.transpose(1, 2) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]))   # [B, nh, S, hd]
            keys, values = cache.update(index, slots, k, v)                       # [B, nh, T, hd]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, nh, S, hd]
        h = torch.add(self.dense(attn.transpose(1, 2).reshape(B, S, H)), a, alpha=self.alpha)
        m = self.ln2(h)
        return torch.add(self.down(self.up(m)), m, alpha=self.alpha)


class FastGLM(nn.Module):
    def __init__(self, model):
        """model: a loaded VisualGLM (sat) model; its GLM tensors are shared, not copied."""
        super().__init__()
        t, config = model.transformer, model.config
        self.heads, self.layers_n = config["num_attention_heads"], config["num_layers"]
        self.head_dim = config["hidden_size"] // self.heads
        alpha = math.sqrt(2 * self.layers_n)
        self.word = Embedding(t.word_embeddings.weight)                           # [V, H] (int8 under --quant)
        self.vocab_size = t.word_embeddings.weight.shape[0]
        self.blocks = nn.ModuleList(Block(layer, alpha, self.heads) for layer in t.layers)
        self.final_ln = t.final_layernorm
        self.lm_head = linear_of(model.mixins["chatglm-final"].lm_head)
        self.max_positions = int(config.get("max_sequence_length", 2048))
        self._rope = None

    @property
    def device(self) -> torch.device:
        return self.final_ln.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.word.dtype

    def rope_tables(self, dtype, device):
        """cos, sin [positions, hd/2] and the channel permutation and sign of rotate_half."""
        if self._rope is None or self._rope[0].dtype != dtype or self._rope[0].device != torch.device(device):
            self._rope = (*rotary_table(self.max_positions + 1, self.head_dim // 2, dtype, device),
                          *rotary_pairs(self.head_dim, device))
        return self._rope

    def embed_tokens(self, ids, image_embeds=None, pre_image=None):
        """ids [B, S] -> [B, S, H]; image_embeds [B, L, H] written over the slots from pre_image[b]
        (rows with pre_image < 0 have no image)."""
        x = self.word(ids)
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
        return self.logits(self.hidden(x, positions, cache, slots, mask)[:, -1])

    def hidden(self, x, positions, cache: KVCache, slots, mask) -> torch.Tensor:
        """The blocks alone, same arguments as forward -> hidden states of every position [B, S, H]
        (a prompt padded to a fixed length takes its logits at its own last position, see prefill.py)."""
        cos, sin, perm, sign = self.rope_tables(x.dtype, x.device)
        # first half of each head: position ids; second half: block position ids
        cos = torch.cat([cos[positions[:, 0]], cos[positions[:, 1]]], dim=-1)[:, :, None, None]   # [B, S, 1, 1, hd]
        sin = torch.cat([sin[positions[:, 0]], sin[positions[:, 1]]], dim=-1)[:, :, None, None] * sign.to(x.dtype)
        rope = (cos, sin, perm)
        with sdpa_kernel(PREFILL_BACKENDS) if x.shape[1] > 1 else contextlib.nullcontext():
            for index, block in enumerate(self.blocks):
                x = block(x, rope, cache, index, slots, mask)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, H] hidden states -> logits [B, V] (fp32): final LayerNorm and LM head."""
        return self.lm_head(self.final_ln(h)).float()
