"""The batched decoding loop shared by every front end, over a backend (model/backend.py).

One prefill runs the whole left-padded batch of prompts; then one token per step for every row against
the backend's key/value cache, so nothing is recomputed. Each row keeps its own sampling settings
(model/sampling.py) and ends on its own: at an eos id, at max_length tokens or at max_new_tokens.

On a GPU the loop runs one step ahead: the sampled tokens stay on the device and feed the next step,
which is queued before the host reads them (one copy per step, model/transfer.py) and hands them to the
caller, so that the GPU need not wait for Python. Nothing else in a step may wait for the GPU (a GPU test
checks it). A row that ends on an eos token has one more step computed for it, which is dropped: rows
never attend to each other.
"""
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch

from .backend import as_backend
from .positions import batch_inputs, next_positions
from .sampling import EMPTY_ERROR, NAN_ERROR, RowSettings, SamplingParams, StepSampler
from .transfer import PinnedRing


@dataclass
class Request:
    """One prompt to continue. image_embeds [L, hidden] spliced at `pre_image` (its index in `ids`)."""
    ids: List[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    image_embeds: Optional[torch.Tensor] = None
    pre_image: int = -1
    generator: Optional[torch.Generator] = None
    error: Optional[Exception] = None    # why the row ended early, with generate(isolate_errors=True)


def images_of(requests: Sequence[Request], pads: List[int], device):
    """The batch's image embeddings [B, L, hidden] and first-slot indices [B] (rows without an image get
    zeros and -1), or (None, None) when no row has an image."""
    if all(r.image_embeds is None for r in requests):
        return None, None
    ref = next(r.image_embeds for r in requests if r.image_embeds is not None)
    embeds = torch.stack([(r.image_embeds if r.image_embeds is not None else torch.zeros_like(ref)).to(device)
                          for r in requests])
    starts = torch.tensor([pad + r.pre_image if r.image_embeds is not None else -1
                           for r, pad in zip(requests, pads)], device=device)
    return embeds, starts


class RowProgress:
    """How far one request has got, and whether (and why) it ended: the rules every decoding loop
    shares (this one and model/continuous.py)."""

    def __init__(self, request: Request):
        self.request = request
        self.generated = 0
        self.reason: Optional[str] = "length" if len(request.ids) >= request.params.max_length else None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _full(self, generated: int) -> bool:
        """Whether `generated` answer tokens reach max_length or max_new_tokens."""
        p = self.request.params
        return len(self.request.ids) + generated >= p.max_length or (
            p.max_new_tokens is not None and generated >= p.max_new_tokens)

    @property
    def may_go_on(self) -> bool:
        """Whether the row may need another step after its next token (only the token itself, an eos,
        could still end it): what a loop that runs ahead asks before queueing that step."""
        return not self.done and not self._full(self.generated + 1)

    def take(self, token: int, nan: bool, empty: bool, eos_ids: Sequence[int], isolate_errors: bool) -> Optional[int]:
        """Record one sampled token; return it when it belongs to the answer, None when the row ended on
        it (an eos id; or a NaN / empty sampling step, which raises unless isolate_errors). A returned
        token may end the row too (max_length, max_new_tokens): see `reason`."""
        if nan or empty:
            error = ValueError(NAN_ERROR if nan else EMPTY_ERROR)
            if not isolate_errors:
                raise error
            self.request.error, self.reason = error, "error"     # one row's failure is that row's alone
            return None
        if token in eos_ids:
            self.reason = "stop"
            return None
        self.generated += 1
        if self._full(self.generated):
            self.reason = "length"
        return token


@torch.inference_mode()
def generate(model, requests: Sequence[Request], pad_id: int, eos_ids: Sequence[int], *,
             isolate_errors: bool = False, ahead: Optional[bool] = None) -> Iterator[List[Optional[int]]]:
    """Yield, per decoding step, the new token of every request (None once a request has finished).
    A request finishes on an eos id (not yielded), at max_length total tokens or at max_new_tokens.
    model: a backend, or a loaded model (wrapped by as_backend).

    isolate_errors: when sampling a row raises, that row alone finishes, with the exception in its
    `request.error`, and the other rows go on (a server batching strangers' requests wants this).
    Otherwise the exception propagates. A failing forward pass always propagates: it is every row's.
    ahead: queue each step before reading the previous one's tokens (see the module's docstring);
    default on CUDA, where it lets the GPU run while Python works. Results are the same either way."""
    backend = as_backend(model)
    device = backend.device
    ahead = device.type == "cuda" if ahead is None else ahead
    for r in requests:
        r.error = None
    ids, positions, mask, pads = batch_inputs([r.ids for r in requests], pad_id, device=device,
                                              dtype=torch.bool)  # [B, S], [B, 2, S], [B, 1, S, S]
    image_embeds, pre_image = images_of(requests, pads, device)
    capacity = max(r.params.max_length for r in requests)         # lets a static-cache backend size its cache
    logits, cache = backend.prefill(ids, positions, mask, image_embeds, pre_image, capacity=capacity)  # [B, V]

    batch = len(requests)
    ring = PinnedRing()
    rows = RowSettings.of([r.params for r in requests], logits.shape[-1], device, ring)
    generators = [r.generator for r in requests]
    make = getattr(backend, "step_sampler", None)                 # a backend's faster sampler, if any
    sample = (make(rows, batch, logits.shape[-1], generators, ring) if make is not None else None) or \
        StepSampler(rows, batch, logits.shape[-1], device, generators, ring)
    progress = [RowProgress(r) for r in requests]
    key_mask = torch.arange(ids.shape[1], device=device)[None] >= ring.to_device(pads, torch.long, device)[:, None]
    positions = positions[:, :, -1:]                                                             # [B, 2, 1]

    def next_step(tokens):                                         # tokens [B, 1] on the device
        nonlocal positions, key_mask
        positions = next_positions(positions)                                                    # [B, 2, 1]
        key_mask = torch.cat([key_mask, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)  # [B, T]
        return backend.decode_step(tokens, positions, key_mask, cache)

    while not all(p.done for p in progress):
        tokens, stacked = sample(logits)                                  # [B], [3, B] on the device
        copy = ring.to_host(stacked)
        queued = next_step(tokens[:, None]) if ahead and any(p.may_go_on for p in progress) else None
        host_tokens, host_nan, host_empty = copy.wait()                                        # one sync
        step = [None if p.done else p.take(host_tokens[b], host_nan[b], host_empty[b], eos_ids, isolate_errors)
                for b, p in enumerate(progress)]
        if any(t is not None for t in step):
            yield step
        if all(p.done for p in progress):
            break
        if queued is None:       # finished rows feed pad, as they would any token: nothing reads their results
            queued = next_step(ring.to_device([[t if t is not None else pad_id] for t in step], torch.long, device))
        logits, cache = queued
