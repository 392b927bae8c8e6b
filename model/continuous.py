"""Continuous batching: sequences join and leave a running batch between decoding steps.

generate() (model/generation.py) runs a fixed batch to its end. A server wants better: a request that
arrives while others decode is prefilled and decodes with them from the next step, and one that ends
frees its place at once. The scheduler here does that over a *slot backend* (model/fast/slots.py):

    slots.slots, slots.length                         how many sequences, of at most how many tokens
    slots.prefill(rows, ids, positions, mask, image_embeds, pre_image, pads) -> logits [N, V]
    slots.decode(tokens, positions, index)            -> logits [n, V] for slots 0..n-1 (tokens: a tensor
                                                         [slots] on the device, each slot's next input)

    batch = ContinuousBatch(slots, pad_id, eos_ids)
    events = batch.admit(requests)     # prefill into free slots; each gets its first token
    events = batch.step()              # one token for every running sequence
    batch.cancel(request)              # leave now

Each event is (request, token or None, reason or None): a token of the answer, and/or the reason the
request ended ("stop", "length", "error" with request.error set). Sampling and the end-of-row rules are
generate()'s (model/sampling.py, RowProgress), so a greedy answer is the same either way.

On a GPU the batch runs one step ahead, as generate() does: step() queues the next decoding step (its
input tokens never leave the device) before it reads the tokens of the previous one, so the GPU computes
while the host does the bookkeeping and the server streams text; each step's events come out one call
later. A sequence that ended on an eos is found out one step late: the step computed for it meanwhile is
dropped. admit() reads its first tokens at once (time to first token).
"""
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .generation import Request, RowProgress, images_of
from .positions import batch_inputs
from .sampling import RowSettings, draw, rank_logits
from .transfer import HostCopy, PinnedRing


class Event(NamedTuple):
    request: Request
    token: Optional[int]
    reason: Optional[str]


@dataclass
class _Sequence:
    progress: RowProgress
    position: int            # the 2-D position ids of its next input token (the token itself is on the
    block: int               # device: ContinuousBatch._tokens)
    index: int               # the cache index that token goes to
    serial: int              # tells sequences apart for the settings cache (ids of dead objects recur)
    pending: bool = False    # a step was queued for it whose token is not read yet


class ContinuousBatch:
    def __init__(self, slots, pad_id: int, eos_ids: Sequence[int], *, isolate_errors: bool = True,
                 ahead: Optional[bool] = None):
        """ahead: run one step ahead (see above); default on CUDA. Answers are the same either way."""
        self.slots, self.pad_id, self.eos_ids = slots, pad_id, list(eos_ids)
        self.isolate_errors = isolate_errors
        self.ahead = slots.device.type == "cuda" if ahead is None else ahead
        self.running: Dict[int, _Sequence] = {}           # slot -> sequence
        self._seen: Optional[torch.Tensor] = None          # [slots, V] tokens each slot has generated
        self._tokens: Optional[torch.Tensor] = None        # [slots] each slot's next input token
        self._queued: Optional[tuple] = None               # the step not read yet: (HostCopy, [(slot, seq)])
        self._settings: Dict[tuple, RowSettings] = {}      # per set of rows: rebuilt only when it changes
        self._serial = 0
        self._ring = PinnedRing()                          # host <-> device copies that do not wait

    @property
    def free(self) -> int:
        return self.slots.slots - len(self.running)

    # -- joining --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, requests: Sequence[Request]) -> List[Event]:
        """Prefill up to `free` requests (one batched forward pass) into the lowest free slots and sample
        their first tokens. Requests whose sequence could exceed a slot end at once with an error."""
        events, ready = [], []
        for r in requests:
            r.error = None
            if r.params.max_length > self.slots.length:
                r.error = ValueError(f"max_length {r.params.max_length} is more than the {self.slots.length} "
                                     f"tokens a sequence may hold here")
                events.append(Event(r, None, "error"))
            else:
                ready.append(r)
        if not ready:
            return events
        if len(ready) > self.free:
            raise RuntimeError(f"{len(ready)} requests for {self.free} free slots")
        rows = [s for s in range(self.slots.slots) if s not in self.running][:len(ready)]
        device = self.slots.device
        ids, positions, mask, pads = batch_inputs([r.ids for r in ready], self.pad_id, device=device,
                                                  dtype=torch.bool)       # [N, S], [N, 2, S], [N, 1, S, S]
        image_embeds, pre_image = images_of(ready, pads, device)
        logits = self.slots.prefill(rows, ids, positions, mask, image_embeds, pre_image, pads=pads)   # [N, V]
        if self._seen is None:
            self._seen = torch.zeros(self.slots.slots, logits.shape[-1], dtype=torch.bool, device=device)
            self._tokens = torch.full((self.slots.slots,), self.pad_id, dtype=torch.long, device=device)
            self._true = torch.ones((), dtype=torch.bool, device=device)   # a value on the device: no copy
        self._seen.index_fill_(0, self._ring.to_device(rows, torch.long, device), False)
        last = positions[:, :, -1].tolist()
        seqs = []
        for b, (row, r) in enumerate(zip(rows, ready)):
            self._serial += 1
            seqs.append(_Sequence(RowProgress(r), last[b][0], last[b][1] + 1, ids.shape[1] - pads[b], self._serial))
            self.running[row] = seqs[-1]
        return events + self._read(self._sample(rows, seqs, logits), list(zip(rows, seqs)))

    # -- decoding -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> List[Event]:
        """One decoding step for every running sequence: returns its events, or, running ahead, those of
        the step before (this one is queued)."""
        launch = [(row, s) for row, s in sorted(self.running.items())
                  if (s.progress.may_go_on if s.pending else not s.progress.done)]
        queued = None
        if launch:
            n = launch[-1][0] + 1
            positions, index = [(0, 0)] * n, [0] * n             # slots not launched: anything in range
            for row, s in launch:
                positions[row], index[row] = (s.position, s.block), s.index
            logits = self.slots.decode(self._tokens, positions, index)                   # [n, V]
            rows = [row for row, _ in launch]
            queued = (self._sample(rows, [s for _, s in launch], logits), launch)
            for _, s in launch:
                s.pending, s.index, s.block = True, s.index + 1, s.block + 1   # the mask position stays
        events = self._read(*self._queued) if self._queued is not None else []
        self._queued = queued
        if not self.ahead and queued is not None:
            events, self._queued = events + self._read(*queued), None
        return events

    def cancel(self, request: Request) -> bool:
        """Take a request out of the batch (its slot is free for the next admit); False if not running."""
        for row, s in list(self.running.items()):
            if s.progress.request is request:
                self._leave(row)
                return True
        return False

    # -- mechanics ------------------------------------------------------------------------------------
    def _sample(self, rows: List[int], seqs: List[_Sequence], logits: torch.Tensor) -> HostCopy:
        """Sample a token for each of `rows` (slots) from logits [n, V] (row r's at index r, or [N, V] in
        the order of `rows` when N == len(rows)) on the device, where it becomes the slot's next input;
        start copying (token, nan, empty) to the host. Nothing here waits for the GPU."""
        settings = self._settings_for(seqs, logits)
        rows_t = self._ring.to_device(rows, torch.long, logits.device)                          # [N]
        if logits.shape[0] != len(rows):
            logits = logits.index_select(0, rows_t)
        ranked = rank_logits(logits, self._seen.index_select(0, rows_t), settings)
        tokens = draw(ranked, settings, [s.progress.request.generator for s in seqs], self._ring)   # [N]
        self._seen.index_put_((rows_t, tokens), self._true)
        self._tokens.index_copy_(0, rows_t, tokens)
        return self._ring.to_host(torch.stack([tokens, ranked.nan.long(), ranked.empty.long()]))

    def _read(self, copy: HostCopy, launched: List[tuple]) -> List[Event]:
        """Wait for a sampled step's tokens; record them for the sequences still running in their slots
        (not those that ended or were cancelled since it was queued); end finished ones."""
        host_tokens, host_nan, host_empty = copy.wait()
        events = []
        for b, (row, s) in enumerate(launched):
            if self.running.get(row) is not s:
                continue
            s.pending = False
            token = s.progress.take(host_tokens[b], host_nan[b], host_empty[b], self.eos_ids, self.isolate_errors)
            events.append(Event(s.progress.request, token, s.progress.reason))
            if s.progress.done:
                self._leave(row)
        return events

    def _settings_for(self, seqs, logits) -> RowSettings:
        key = tuple(s.serial for s in seqs)
        if key not in self._settings:
            if len(self._settings) > 64:
                self._settings.clear()
            self._settings[key] = RowSettings.of([s.progress.request.params for s in seqs], logits.shape[-1],
                                                 logits.device, self._ring)
        return self._settings[key]

    def _leave(self, row: int) -> None:
        del self.running[row]            # the slot is free: the next prefill into it overwrites what matters
