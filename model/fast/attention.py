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

Like kernels.py, nothing imports Triton at load time, and torch.compile sees one opaque op,
visualglm::decode_attention, which writes into keys and values.
"""
import math

import torch

from .kernels import AVAILABLE, counters  # (AVAILABLE: the fast path asks here too)

BLOCK_T = 32          # positions per block of a program's chunk
PROGRAMS = 264        # programs to aim for (two per SM of an H100 / H200): rows x heads x chunks

_built = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(qkv_ptr, cos_ptr, sin_ptr, perm_ptr, k_ptr, v_ptr, mask_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr,
               count_ptr, out_ptr, heads, scale, sxb, skb, skh, skt, svb, svh, svt, smb, ssb, sob, soh,
               HD: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
        bh, c = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        d = tl.arange(0, HD)
        slot = tl.load(slot_ptr + b * ssb)
        # the new token: q and k rotated (q * cos + q[perm] * sin) and rounded as the cache holds them
        perm = tl.load(perm_ptr + d)
        cos = tl.load(cos_ptr + b * HD + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * HD + d).to(tl.float32)
        qs = qkv_ptr + b * sxb + h * HD                       # this head's q; its k and v follow each a layer's width on
        width = heads * HD
        q = tl.load(qs + d).to(tl.float32) * cos + tl.load(qs + perm).to(tl.float32) * sin
        q = q.to(out_ptr.dtype.element_ty).to(tl.float32) * scale                                  # [HD]
        k_new = (tl.load(qs + width + d).to(tl.float32) * cos +
                 tl.load(qs + width + perm).to(tl.float32) * sin).to(k_ptr.dtype.element_ty)      # [HD]
        v_new = tl.load(qs + 2 * width + d).to(v_ptr.dtype.element_ty)
        # this program's chunk of positions 0..slot
        chunk = tl.cdiv(tl.cdiv(slot + 1, SPLITS), BLOCK) * BLOCK
        start = c * chunk
        end = tl.minimum(start + chunk, slot + 1)
        if (slot >= start) & (slot < end):
            tl.store(k_ptr + b * skb + h * skh + slot * skt + d, k_new)
            tl.store(v_ptr + b * svb + h * svh + slot * svt + d, v_new)
        m_i = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)                  # running max
        l_i = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)                                 # running sum
        acc = tl.zeros((HD,), tl.float32)                                                    # sum p * v
        for t0 in range(start, end, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            inside = t < end
            cached = inside & (t != slot)            # the three loads are independent: issued together
            keep = tl.load(mask_ptr + b * smb + t, mask=inside, other=0) != 0
            k = tl.load(k_ptr + b * skb + h * skh + t[:, None] * skt + d[None, :], mask=cached[:, None], other=0.0)
            v = tl.load(v_ptr + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=cached[:, None], other=0.0)
            new = (t == slot)[:, None]
            k = tl.where(new, k_new[None, :], k).to(tl.float32)                              # [BLOCK, HD]
            v = tl.where(keep[:, None], tl.where(new, v_new[None, :], v), 0.0).to(tl.float32)     # [BLOCK, HD]
            s = tl.where(keep, tl.sum(k * q[None, :], axis=1), float("-inf"))               # [BLOCK]
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a block with nothing kept so far: no NaN
            p = tl.exp(s - m_safe)
            rescale = tl.exp(m_i - m_safe)
            l_i = l_i * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        at = bh * SPLITS + c
        tl.store(m_ptr + at, m_i)
        tl.store(l_ptr + at, l_i)
        tl.store(acc_ptr + at * HD + d, acc)
        tl.debug_barrier()                         # every thread's partials stored before the count moves
        if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            # the last chunk of this (row, head) to finish merges them all
            cs = tl.arange(0, SPLITS)
            m = tl.load(m_ptr + bh * SPLITS + cs, cache_modifier=".cg")                  # [SPLITS], from L2
            w = tl.exp(m - tl.max(m, axis=0))               # chunks with nothing to attend (-inf): 0
            total = tl.sum(w * tl.load(l_ptr + bh * SPLITS + cs, cache_modifier=".cg"), axis=0)
            part = tl.load(acc_ptr + (bh * SPLITS + cs)[:, None] * HD + d[None, :], cache_modifier=".cg")
            out = tl.sum(w[:, None] * part, axis=0) / total
            tl.store(out_ptr + b * sob + h * soh + d, out.to(out_ptr.dtype.element_ty))
            tl.store(count_ptr + bh, 0)                     # ready for the next call (and graph replay)

    return kernel


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
    global _built
    if _built is None:
        _built = _build()
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
    _built[(B * heads, splits)](qkv, cos, sin, perm, keys, values, mask, slots, m, l_, acc, count, out, heads,
                                1.0 / math.sqrt(hd), qkv.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
                                values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
                                slots.stride(0), out.stride(0), out.stride(1), HD=hd, BLOCK=BLOCK_T, SPLITS=splits)
    return out


@torch.library.custom_op("visualglm::decode_attention", mutates_args=("keys", "values"))
def decode_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, perm: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return decode_attention(qkv, cos, sin, perm, keys, values, mask, slots)


@decode_attention_op.register_fake
def _(qkv, cos, sin, perm, keys, values, mask, slots):
    _, heads, _, hd = keys.shape
    return qkv.new_empty(mask.shape[0], heads, 1, hd)                      # contiguous, as decode_attention's output
