"""generate()'s sampling step (model/sampling.py StepSampler) replayed as one CUDA graph.

Why: the step is ~50 small kernels (ranking, top-k / top-p, the draw, bookkeeping). Launched one by one
from Python they took 0.86 ms of host time per token on an H200, and on the GPU, between the decode
graph's replays, ~0.27 ms per int8 token where their kernels alone take ~0.16 ms (docs/benchmarks.md).

How: one graph per (batch, vocabulary, ranks, penalty on/off, invalid slices or not), kept by the backend
across calls. It reads static copies of the logits and of the rows' settings, which each generate() call
loads (load()), and its own record of the rows' generated tokens, cleared there. Its random numbers come
from the GPU's generator inside the graph, so rows with a torch.Generator of their own (a seed) are not
served by it: they keep the eager step, whose draws come from their generators. On a GPU with Triton the
captured step is KernelStepSampler: everything after the ranking in one kernel (sampling_kernel.py).
"""
from typing import Optional

import torch

from ..sampling import RowSettings, StepSampler, candidates, uniforms
from . import sampling_kernel
from .graphs import try_record


class KernelStepSampler(StepSampler):
    """StepSampler with everything after the ranking in one kernel (sampling_kernel.py): the same
    candidates and uniform numbers, so the same tokens but for draws within rounding of a boundary."""

    def __call__(self, logits: torch.Tensor):
        values, tokens = candidates(logits, self.seen, self.rows)                   # [B, R]
        u = uniforms(self.generators, logits.device, self.ring)                     # [B]
        out = sampling_kernel.sample(values, tokens, self.rows, u, self.seen)       # [3, B]
        return out[0], out


class CapturedSampler:
    def __init__(self, rows: RowSettings, batch: int, vocab: int, device):
        """Static buffers shaped after `rows` (a call's settings; see load for the values)."""
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.rows = RowSettings(rows.plain.clone(), rows.penalised.clone(), rows.top_k.clone(), rows.top_p.clone(),
                                rows.greedy.clone(), rows.ranks, rows.penalises,
                                None if rows.invalid is None else rows.invalid.clone())
        fused = sampling_kernel.fits(rows.ranks, torch.device(device).type == "cuda")
        self.step = (KernelStepSampler if fused else StepSampler)(self.rows, batch, vocab, device, [None] * batch)
        recorded = try_record(lambda: self.step(self.logits)[1], self.logits, "sampling step")
        self.graph, self.out = recorded if recorded is not None else (None, None)     # out [3, B]

    @property
    def ok(self) -> bool:
        return self.graph is not None

    @staticmethod
    def key(rows: RowSettings, batch: int, vocab: int) -> tuple:
        """What a graph is recorded for; the settings' values are loaded per call."""
        return batch, vocab, rows.ranks, rows.penalises, rows.invalid is not None

    def load(self, rows: RowSettings) -> "CapturedSampler":
        """Take a new call's settings and forget the tokens of the last one."""
        mine = self.rows
        for name in ("plain", "penalised", "top_k", "top_p", "greedy"):
            getattr(mine, name).copy_(getattr(rows, name))
        if mine.invalid is not None:
            mine.invalid.copy_(rows.invalid)
        self.step.seen.zero_()
        return self

    def __call__(self, logits: torch.Tensor):
        """StepSampler's call: (tokens [B], [3, B]), views of the graph's output (read before the next)."""
        self.logits.copy_(logits)
        self.graph.replay()
        return self.out[0], self.out


class SamplerCache:
    """The captured samplers of one backend, the most recent few (each holds [B, V] logits and marks)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._samplers = {}

    def get(self, rows: RowSettings, batch: int, vocab: int, device) -> Optional[CapturedSampler]:
        key = CapturedSampler.key(rows, batch, vocab)
        sampler = self._samplers.pop(key, None)
        if sampler is None:
            if len(self._samplers) >= self.size:
                self._samplers.pop(next(iter(self._samplers)))
            sampler = CapturedSampler(rows, batch, vocab, device)
        self._samplers[key] = sampler                 # most recent last; a failed capture is kept as such
        return sampler.load(rows) if sampler.ok else None
