"""One decoding step's attention for one new token per row, in one Triton kernel: the rotary embedding of
the new query and key, the new key and value written into the cache, and attention over the cache.

Why: decoding attends a single query per head to a few hundred cached positions, a few MB per layer.
cuDNN's flash attention took 8.5 us per layer for it at batch 1 on an H200 (docs/benchmarks.md), about
three times what reading the keys and values takes. And around it, a compiled step launched three small
kernels per layer (rotary, key write, value write) and a second one to merge the split-K partials: on an
H200 these four took 5.2 us per layer, plus ~0.45 us of gap each between kernels, of a 2.2 ms int4 token
(torch.profiler; the kernel took int4 from 465 to 495 tokens/s, docs/benchmarks.md).

How (split-K, "flash decoding"): program (row, head, chunk) rotates q and the new k (both rounded to the
cache's dtype, as the unfused step stores them), takes one chunk of positions 0..slot, and keeps a running
max, sum and weighted sum of values over it; the new token's key and value come from registers (the chunk
holding `slot` also writes them into the cache, and no program reads that slot from memory). Positions the
mask removes (a row's left padding) score -inf. Each program stores its partials, and the last of a (row,
head)'s chunks to finish, found by an atomic counter that it resets to zero, merges them. Sums are fp32.

    qkv [B, 3 * nh * hd] (q, k, v of each head, as the query_key_value layer makes them), cos / sin
    [B, hd] (sin already signed for rotate_half, see glm.rotary_pairs), perm [hd], keys / values
    [>= B, nh, >= T, hd] the layer's cache (row b's first T slots are its sequence; last dim contiguous),
    mask [B, T] bool (the new slot included), slots [B] each row's new cache slot (< T; any stride: a
    batch that shares one slot passes it expanded) -> [B, nh, 1, hd] in qkv's dtype

Like kernels.py, nothing imports Triton at load time (the kernel is in triton_attention.py), and
torch.compile sees one opaque op, visualglm::decode_attention, which writes into keys and values.
"""
import math

import torch

from .kernels import AVAILABLE, counters, pdl_options  # (AVAILABLE: the fast path asks here too)

BLOCK_T = 32          # positions per block of a program's chunk
PROGRAMS = 264        # programs to aim for (two per SM of an H100 / H200): rows x heads x chunks

def splits_for(rows_heads: int, T: int) -> int:
    """Chunks per (row, head): enough programs to fill the GPU, a power of two (the merge's width), each
    chunk at least one block of a cache of T slots."""
    want = max(1, math.ceil(PROGRAMS / rows_heads))
    most = max(1, math.ceil(T / BLOCK_T))
    return 1 << (min(want, most) - 1).bit_length()


def fits(batch: int, positions: int, head_dim: int, on_gpu: bool) -> bool:
    """Whether a step takes this kernel: one new token of one row (batch-1 decoding, where it was
    measured; prompts and batched decoding go through SDPA) on a GPU; tl.arange needs a power-of-two head."""
    return batch == 1 and positions == 1 and on_gpu and AVAILABLE and head_dim & (head_dim - 1) == 0


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, perm: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """See the module docstring; scale 1/sqrt(hd), as scaled_dot_product_attention's default."""
    from .triton_attention import kernel                   # imports Triton: on first use
    B, T = mask.shape[0], mask.shape[-1]
    _, heads, _, hd = keys.shape
    if qkv.shape != (B, 3 * heads * hd) or qkv.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode_attention takes qkv [B, 3 * heads * head_dim] and caches with contiguous heads")
    if mask.dim() != 2 or mask.stride(-1) != 1:
        raise ValueError("decode_attention takes mask [B, T] with contiguous rows")
    if cos.shape != (B, hd) or sin.shape != (B, hd) or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("decode_attention takes cos and sin [B, head_dim], contiguous")
    splits = splits_for(B * heads, T)
    m = torch.empty(B * heads, splits, dtype=torch.float32, device=qkv.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(B * heads, splits, hd, dtype=torch.float32, device=qkv.device)
    out = torch.empty(B, heads, 1, hd, dtype=qkv.dtype, device=qkv.device)
    count = counters(qkv.device, B * heads)
    kernel[(B * heads, splits)](qkv, cos, sin, perm, keys, values, mask, slots, m, l_, acc, count, out, heads,
                                1.0 / math.sqrt(hd), qkv.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
                                values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
                                slots.stride(0), out.stride(0), out.stride(1), HD=hd, BLOCK=BLOCK_T, SPLITS=splits,
                                **pdl_options(qkv.device))
    return out


@torch.library.custom_op("visualglm::decode_attention", mutates_args=("keys", "values"))
def decode_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, perm: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return decode_attention(qkv, cos, sin, perm, keys, values, mask, slots)


@decode_attention_op.register_fake
def _(qkv, cos, sin, perm, keys, values, mask, slots):
    _, heads, _, hd = keys.shape
    return qkv.new_empty(mask.shape[0], heads, 1, hd)                      # contiguous, as decode_attention's output
