"""A static key/value cache, preallocated once and written by index (no concatenation per step)."""
import torch


class CacheOverflow(RuntimeError):
    """A sequence would grow past the cache's preallocated length."""


class KVCache(torch.nn.Module):
    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (layers, batch, heads, length, head_dim)                 # [L, B, nh, T, hd]
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.batch, self.length = batch, length

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, nh, S, hd] at cache slots [S]; return the whole cache of that layer
        [B, nh, T, hd] (unwritten slots are masked out by the caller)."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]
