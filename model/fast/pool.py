"""Key/value memory for continuous batching: a pool of sequence slots, each with room for `length` tokens.

    pool.k[layer], pool.v[layer]     [slots, nh, length, hd]

A sequence owns one slot from its prefill until it ends, and its tokens sit at cache indices 0, 1, 2 ...
of that slot, whatever left padding its prompt had in the prefill batch. FastGLM talks to a cache through
`update(layer, index, k, v) -> (keys, values)`; the pool hands out two such views:

    prefill_view(rows)       writes a left-padded batch of prompts into the slots `rows`, each row's real
                             tokens from index 0 on; attention sees the prompts only
    decode_view(n, span)     one new token for each of slots 0..n-1 at its own index; attention sees the
                             first `span` indices of those slots (the caller masks what is not written)

Shapes stay fixed per (n, span), so a decode step can be captured in a CUDA graph per bucket.
"""
import torch


class SlotPool:
    def __init__(self, layers: int, slots: int, heads: int, length: int, head_dim: int, dtype, device):
        shape = (slots, heads, length, head_dim)
        # one tensor per layer, as in KVCache (torch.compile and graphs write them in place)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.length = slots, length

    @staticmethod
    def bytes_per_token(layers: int, heads: int, head_dim: int, dtype) -> int:
        """Memory of one cached token in every layer (keys and values)."""
        return 2 * layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def prefill_index(self, pads, width: int, device) -> torch.Tensor:
        """[N, width] cache index of each position of a left-padded prompt batch: real tokens from 0 on;
        padding goes to the slot's last index, which stays masked until the row itself writes there."""
        pads = torch.as_tensor(pads, device=device)[:, None]
        index = torch.arange(width, device=device)[None] - pads
        return torch.where(index >= 0, index, self.length - 1)

    def prefill_view(self, rows: torch.Tensor) -> "_PrefillView":
        return _PrefillView(self, rows)

    def decode_view(self, n: int, span: int) -> "_DecodeView":
        return _DecodeView(self, n, span)


class _PrefillView:
    """Prompts of rows [N] into their slots; their attention needs nothing older than the prompt itself."""

    def __init__(self, pool: SlotPool, rows: torch.Tensor):
        self.pool, self.rows = pool, rows

    def update(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """index [N, S] cache index of every prompt position (see prefill_index), k, v [N, nh, S, hd]
        -> the same k, v (the whole prompt)."""
        at = (self.rows[:, None], slice(None), index)                      # -> [N, S, nh, hd] positions
        self.pool.k[layer][at] = k.transpose(1, 2)
        self.pool.v[layer][at] = v.transpose(1, 2)
        return k, v


class _DecodeView:
    """One token for each of slots 0..n-1, written at its own cache index."""

    def __init__(self, pool: SlotPool, n: int, span: int):
        self.pool, self.n, self.span = pool, n, span

    def update(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """index [n] (one cache index per slot), k, v [n, nh, 1, hd] -> keys, values [n, nh, span, hd]."""
        rows = torch.arange(self.n, device=index.device)
        self.pool.k[layer][rows, :, index] = k[:, :, 0]
        self.pool.v[layer][rows, :, index] = v[:, :, 0]
        return self.pool.k[layer][:self.n, :, :self.span], self.pool.v[layer][:self.n, :, :self.span]

    def decode_target(self, layer: int, index: torch.Tensor):
        """As KVCache.decode_target: the pool's keys and values (rows 0..n-1 are slots 0..n-1) and index."""
        return self.pool.k[layer], self.pool.v[layer], index
