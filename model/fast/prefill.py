"""Prefill in fixed-length buckets, so that on CUDA each bucket's whole prefill is one captured graph.

Why: an eager prefill launches every kernel of 28 layers and the LM head from Python, which for a short
chat prompt costs more than the GPU work itself. A graph is recorded for fixed shapes, hence buckets.

How: the prompt [B, S] is padded on the right to the bucket length Sb (the smallest of BUCKETS that
holds it). A pad position attends only to itself and no real position attends to a pad, so the real
positions' hidden states and their keys/values (cache slots 0..S-1) are those of the unpadded prompt.
The pads' keys/values land in slots S..Sb-1, past the sequence: decode steps mask them out and
overwrite them one by one (step t writes slot S+t before reading it). The logits are taken at S-1.
Longer prompts (or a cache too short for the bucket) take the eager path, where launch overhead is a
small part of the work anyway.

Reusing the prompt across turns: not done, because it would change the answers. GLM attends
bidirectionally over the whole prompt (everything before <sop>), so when turn 2 appends its question
the keys/values of turn 1's tokens change from the second layer on (tests/test_fast_prefix.py checks
this on a tiny model). What a conversation does reuse is the image: its embeddings are cached by
model/image_cache.py (and chat() hands them back for the next turn), so a second turn re-runs only
the GLM prefill, never the image encoder.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .cache import KVCache
from .graphs import try_record

BUCKETS = (64, 128, 256, 512)


def bucket_for(length: int, cache_length: int) -> Optional[int]:
    """The bucket a prompt of `length` tokens is padded to, or None (eager) when none fits."""
    return next((b for b in BUCKETS if length <= b <= cache_length), None)


def prefill_mask(mask: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """The prompt's mask [B, 1, S, S] (bool) widened to `rows` query rows and `length` cache slots:
    [B, 1, rows, length]. Rows past S (bucket pads) and left-pad rows see only themselves, so that no
    row is fully masked (NaN)."""
    B, _, S, _ = mask.shape
    full = torch.zeros(B, 1, rows, length, dtype=torch.bool, device=mask.device)
    full[..., :S, :S] = mask
    full[:, 0].diagonal(dim1=-2, dim2=-1).fill_(True)
    return full


def pad_right(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad t along dim to `length`."""
    extra = list(t.shape)
    extra[dim] = length - t.shape[dim]
    return torch.cat([t, t.new_zeros(extra)], dim)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor            # [B, Sb, H]      static inputs, copied into before each replay
    positions: torch.Tensor    # [B, 2, Sb]
    mask: torch.Tensor         # [B, 1, Sb, T]
    last: torch.Tensor         # [1]             index of the prompt's last real position
    logits: torch.Tensor       # [B, V]          static output


class BucketedPrefill:
    """Prefill of one cache in buckets: captured per bucket on CUDA (capture=True), eager otherwise
    (the same padded computation, which is what the CPU tests check; also after a capture failed)."""

    def __init__(self, glm, cache: KVCache, capture: bool):
        self.glm, self.cache, self.capture = glm, cache, capture
        self.graphs: Dict[int, _Graph] = {}
        self.pool = None                                     # one memory pool for all buckets' graphs

    def __call__(self, x, positions, mask, length: int, bucket: int) -> torch.Tensor:
        """x [B, Sb, H], positions [B, 2, Sb], mask [B, 1, Sb, T] padded to `bucket`; the real prompt is
        the first `length` positions -> logits at position length-1 [B, V] (fp32)."""
        last = torch.tensor([length - 1], device=x.device)
        g = self.graphs.get(bucket) or (self._record(x, positions, mask, last) if self.capture else None)
        if g is None:
            return self._run(x, positions, mask, last)
        g.x.copy_(x)
        g.positions.copy_(positions)
        g.mask.copy_(mask)
        g.last.copy_(last)
        g.graph.replay()
        return g.logits.clone()                             # the next replay of any bucket reuses the pool

    def _run(self, x, positions, mask, last):
        slots = torch.arange(x.shape[1], device=x.device)
        h = self.glm.hidden(x, positions, self.cache, slots, mask)                  # [B, Sb, H]
        return self.glm.logits(h.index_select(1, last)[:, 0])                       # [B, V]

    def _record(self, x, positions, mask, last) -> Optional[_Graph]:
        """Warm up once on a side stream, then capture. Both write the cache slots 0..Sb-1, which the
        replay (or eager run) that follows overwrites."""
        x, positions, mask, last = (t.clone() for t in (x, positions, mask, last))
        recorded = try_record(lambda: self._run(x, positions, mask, last), x, "prefill", lambda: self.pool)
        if recorded is None:
            self.capture = False
            return None
        graph, logits = recorded
        self.pool = graph.pool()
        g = self.graphs[x.shape[1]] = _Graph(graph, x, positions, mask, last, logits)
        return g
