"""The Triton source of attention.py's decoding attention kernel (this module imports Triton: it is loaded
on first use). What it computes and why: attention.py."""
import triton
import triton.language as tl

from .triton_gemv import after_previous


@triton.jit
def kernel(qkv_ptr, cos_ptr, sin_ptr, perm_ptr, k_ptr, v_ptr, mask_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr,
           count_ptr, out_ptr, heads, scale, sxb, skb, skh, skt, svb, svh, svt, smb, ssb, sob, soh,
           HD: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    after_previous(PDL)                        # everything it reads but perm comes from earlier kernels
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

