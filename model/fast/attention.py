"""Attention of one new token per row over its cached keys and values (decoding), in Triton.

Why: decoding attends a single query per head to a few hundred cached positions, a few MB per layer.
cuDNN's flash attention took 8.5 us per layer for it at batch 1 on an H200 (docs/benchmarks.md), about
three times what reading the keys and values takes; SDPA's kernels are built for many queries.

How (split-K, "flash decoding"): each program takes one (row, head) and one chunk of the cached
positions, and keeps a running max, sum and weighted sum of values over its chunk; blocks of positions
that the mask removes entirely are not read at all (a cache bucket is mostly empty early in an answer). A
second small kernel merges the chunks. Scores and sums are fp32.

    q [B, nh, 1, hd], keys / values [B, nh, T, hd] (any strides, last dim contiguous), mask [B, 1, 1, T]
    bool (True: attend; every row attends somewhere) -> [B, nh, 1, hd] in q's dtype

Like kernels.py, nothing imports Triton at load time, and torch.compile sees one opaque op,
visualglm::decode_attention.
"""
import math

import torch

from .kernels import AVAILABLE  # noqa: F401 - the fast path asks here too

BLOCK_T = 32          # positions per block of a program's chunk
PROGRAMS = 264        # programs to aim for (two per SM of an H100 / H200): rows x heads x chunks

_built = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def chunks(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, T, CHUNK, heads, scale,
               sqb, sqh, skb, skh, skt, svb, svh, svt, smb,
               HD: tl.constexpr, BLOCK: tl.constexpr):
        bh, c = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + b * sqb + h * sqh + d).to(tl.float32) * scale                      # [HD]
        m_i = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)                  # running max
        l_i = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)                                 # running sum
        acc = tl.zeros((HD,), tl.float32)                                                    # sum p * v
        start = c * CHUNK
        for t0 in range(start, start + CHUNK, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            keep = tl.load(mask_ptr + b * smb + t, mask=(t < T) & (t < start + CHUNK), other=0) != 0
            if tl.sum(keep.to(tl.int32), axis=0) > 0:             # a block the mask removes is not read
                k = tl.load(k_ptr + b * skb + h * skh + t[:, None] * skt + d[None, :], mask=keep[:, None],
                            other=0.0).to(tl.float32)                                        # [BLOCK, HD]
                s = tl.where(keep, tl.sum(k * q[None, :], axis=1), float("-inf"))            # [BLOCK]
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                p = tl.exp(s - m_new)
                rescale = tl.exp(m_i - m_new)
                v = tl.load(v_ptr + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=keep[:, None],
                            other=0.0).to(tl.float32)
                l_i = l_i * rescale + tl.sum(p, axis=0)
                acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
                m_i = m_new
        at = bh * tl.num_programs(1) + c
        tl.store(m_ptr + at, m_i)
        tl.store(l_ptr + at, l_i)
        tl.store(acc_ptr + at * HD + d, acc)

    @triton.jit
    def merge(m_ptr, l_ptr, acc_ptr, out_ptr, heads, sob, soh, SPLITS: tl.constexpr, HD: tl.constexpr):
        bh = tl.program_id(0)
        c = tl.arange(0, SPLITS)
        d = tl.arange(0, HD)
        m = tl.load(m_ptr + bh * SPLITS + c)                                                 # [SPLITS]
        w = tl.exp(m - tl.max(m, axis=0))                       # chunks with nothing to attend (-inf): 0
        total = tl.sum(w * tl.load(l_ptr + bh * SPLITS + c), axis=0)
        acc = tl.load(acc_ptr + (bh * SPLITS + c)[:, None] * HD + d[None, :])                # [SPLITS, HD]
        out = tl.sum(w[:, None] * acc, axis=0) / total
        b, h = bh // heads, bh % heads
        tl.store(out_ptr + b * sob + h * soh + d, out.to(out_ptr.dtype.element_ty))

    return triton, chunks, merge


def splits_for(rows_heads: int, T: int) -> int:
    """Chunks per (row, head): enough programs to fill the GPU, a power of two (the merge's width), each
    chunk at least one block."""
    want = max(1, math.ceil(PROGRAMS / rows_heads))
    most = max(1, math.ceil(T / BLOCK_T))
    return 1 << (min(want, most) - 1).bit_length()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """See the module docstring; scale 1/sqrt(hd), as scaled_dot_product_attention's default."""
    global _built
    if _built is None:
        _built = _build()
    triton, chunks, merge = _built
    B, heads, S, hd = q.shape
    T = keys.shape[2]
    if S != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention takes one query per row and contiguous head dimensions")
    mask = mask.reshape(B, T)
    splits = splits_for(B * heads, T)
    chunk = math.ceil(math.ceil(T / splits) / BLOCK_T) * BLOCK_T
    m = torch.empty(B * heads, splits, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(B * heads, splits, hd, dtype=torch.float32, device=q.device)
    out = torch.empty(B, heads, 1, hd, dtype=q.dtype, device=q.device)
    chunks[(B * heads, splits)](q, keys, values, mask, m, l_, acc, T, chunk, heads, 1.0 / math.sqrt(hd),
                                q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
                                values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
                                HD=hd, BLOCK=BLOCK_T)
    merge[(B * heads,)](m, l_, acc, out, heads, out.stride(0), out.stride(1), SPLITS=splits, HD=hd)
    return out


@torch.library.custom_op("visualglm::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return decode_attention(q, keys, values, mask)


@decode_attention_op.register_fake
def _(q, keys, values, mask):
    return q.new_empty(q.shape)                                  # contiguous, as decode_attention's output
