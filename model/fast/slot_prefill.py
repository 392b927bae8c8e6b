"""Prefill of a wave of prompts into continuous-batching slots, captured as CUDA graphs per bucket.

Why: run eagerly, a prefill launches every kernel of 28 layers from Python. On an H200 the server's model
process took 26-29 ms to admit one short prompt, which the single-request path (a captured prefill,
prefill.py) prefills and samples in about 7 ms, and a burst of 64 came in 4 waves of 58 ms each.
Replaying a graph costs the GPU time alone.

How: N prompts of S tokens (left-padded among themselves, see FastSlots.prefill) are padded to a bucket
of Nb rows (row_buckets: 1, 2, 4, 8, 12, 16 ...) and Sb positions (prefill.BUCKETS). Pad positions on
the right attend only to themselves and no real position attends to them (prefill_mask), so the real rows'
hidden states are those of the unpadded wave; their keys and values go to the slots' last index, which
stays masked until the sequence itself writes there (as left pads already do). Pad rows write every
position to the last index of the first real row's slot, for the same reason. The logits are taken at
S - 1, every real row's last token. Buckets of more than MAX_TOKENS positions run eagerly: their GPU time
dwarfs the launches, and capturing them would hold their activations for good.

Every bucket's graph reads the same static input buffers (views of the largest shapes) and writes the
logits into the decode graphs' output, so the captures add no memory per bucket beyond their shared pool.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .graphs import try_record
from .prefill import BUCKETS, bucket_for, prefill_mask

MAX_TOKENS = 4096        # rows x positions of the largest captured bucket (64 prompts of up to 64 tokens)
ROW_STEP = 4             # row buckets: 1, 2, then every multiple of 4 (a wave of 13 pads to 16, 17 to 20)


def row_buckets(slots: int) -> List[int]:
    """Prompt counts captured: powers of two below ROW_STEP, then its multiples, ending at `slots`. A burst
    admitted as it arrives comes in waves of any size, and every padded row costs a prompt's compute."""
    small = [1 << i for i in range(ROW_STEP.bit_length() - 1) if 1 << i < slots]
    return small + list(range(ROW_STEP, slots, ROW_STEP)) + [slots]


class SlotPrefill:
    def __init__(self, slots):
        """slots: the FastSlots whose GLM, pool and graph memory this uses."""
        self.slots = slots
        self.rows = row_buckets(slots.slots)      # prompt counts with a bucket
        self.graphs: Dict[Tuple[int, int], "torch.cuda.CUDAGraph"] = {}
        self.capture = True                  # off after a failed capture: eager from then on, with a warning
        self._buffers: Optional[dict] = None

    def buckets(self) -> List[Tuple[int, int]]:
        """Every (rows, positions) bucket that is captured."""
        s = self.slots
        return [(rows, length) for length in BUCKETS if length <= s.length
                for rows in self.rows if rows * length <= MAX_TOKENS]

    def bucket_for(self, n: int, length: int) -> Optional[Tuple[int, int]]:
        rows = next(b for b in self.rows if b >= n)
        padded = bucket_for(length, self.slots.length)
        return (rows, padded) if padded is not None and rows * padded <= MAX_TOKENS else None

    def __call__(self, rows: Sequence[int], x, positions, index, mask) -> torch.Tensor:
        """rows [N] slots, x [N, S, H], positions [N, 2, S], index [N, S] cache indices, mask [N, 1, S, S]
        -> logits at position S - 1 [N, V] (fp32): replayed when capturing and the wave fits a bucket."""
        N, S = index.shape
        key = self.bucket_for(N, S) if self.slots.cuda_graph and self.capture else None
        if key is not None:
            self._load(key, list(rows), x, positions, index, mask)
            # a bucket not captured yet is captured over this wave: its runs write the wave's keys and values
            if key in self.graphs or self._record(key):
                self.graphs[key].replay()
                return self.slots.logits_buffer()[:N].clone()   # the next replay (prefill or decode) reuses it
        last = torch.full((1,), S - 1, device=x.device)
        return self._forward(x, positions, index, torch.as_tensor(list(rows), device=x.device), mask, last)

    def _load(self, key, rows: List[int], x, positions, index, mask) -> None:
        """Copy a wave into bucket `key`'s static inputs (see the module's docstring for the pads)."""
        N, S = index.shape
        Nb, Sb = key
        b = self._fill(key, list(rows) + [rows[0]] * (Nb - N))
        b["x"][:N, :S].copy_(x)
        b["positions"][:N, :, :S].copy_(positions)
        b["index"][:N, :S].copy_(index)
        b["mask"][:N].copy_(prefill_mask(mask, Sb, Sb))
        b["last"].fill_(S - 1)

    def warm_up(self) -> int:
        """Capture every bucket now (nothing is running: their runs write at slot 0's masked last index);
        returns how many were captured."""
        count = 0
        for key in self.buckets():
            if key not in self.graphs and self.capture:
                self._fill(key, [0] * key[0])
                count += self._record(key)
        return count

    # -- mechanics -----------------------------------------------------------------------------------
    def _forward(self, x, positions, index, rows, mask, last) -> torch.Tensor:
        glm = self.slots.glm
        h = glm.hidden(x, positions, self.slots.pool.prefill_view(rows), index, mask)   # [N, S, H]
        return glm.logits(h.index_select(1, last)[:, 0])                                # [N, V]

    def _fill(self, key, rows: List[int]) -> dict:
        """The static inputs of bucket `key`, reset to an all-pad wave into the slots `rows` [Nb]: zero
        inputs, every position at the last cache index, each position seeing only itself."""
        b = self._views(key)
        b["x"].zero_()
        b["positions"].zero_()
        b["index"].fill_(self.slots.length - 1)
        b["rows"].copy_(torch.as_tensor(rows))
        b["mask"].zero_()
        b["mask"][:, 0].diagonal(dim1=-2, dim2=-1).fill_(True)
        b["last"].zero_()
        return b

    def _views(self, key) -> dict:
        """The static inputs of bucket `key` [Nb rows, Sb positions]: views of buffers sized for the
        largest bucket (replays run one at a time, so the buckets share them)."""
        s, (Nb, Sb) = self.slots, key
        if self._buffers is None:
            keys = self.buckets()
            most, hidden = max(r * n for r, n in keys), s.glm.heads * s.glm.head_dim
            self._buffers = dict(
                x=torch.zeros(most, hidden, dtype=s.backend.dtype, device=s.device),
                positions=torch.zeros(most * 2, dtype=torch.long, device=s.device),
                index=torch.zeros(most, dtype=torch.long, device=s.device),
                rows=torch.zeros(max(self.rows), dtype=torch.long, device=s.device),
                mask=torch.zeros(max(r * n * n for r, n in keys), dtype=torch.bool, device=s.device),
                last=torch.zeros(1, dtype=torch.long, device=s.device))
        buf = self._buffers
        return dict(x=buf["x"][:Nb * Sb].view(Nb, Sb, -1), positions=buf["positions"][:Nb * 2 * Sb].view(Nb, 2, Sb),
                    index=buf["index"][:Nb * Sb].view(Nb, Sb), rows=buf["rows"][:Nb],
                    mask=buf["mask"][:Nb * Sb * Sb].view(Nb, 1, Sb, Sb), last=buf["last"])

    def _record(self, key) -> bool:
        """Capture bucket `key` over its static inputs as they are (see warm_up and __call__); False if the
        capture failed."""
        s = self.slots
        b = self._views(key)
        out = s.logits_buffer()[:key[0]]
        recorded = try_record(lambda: out.copy_(self._forward(b["x"], b["positions"], b["index"], b["rows"],
                                                              b["mask"], b["last"])),
                              s.pool.k[0], "prefill of a wave", s.graph_pool)
        if recorded is None:
            self.capture = False
            return False
        self.graphs[key] = recorded[0]
        return True
