"""FastSlots: the slot interface of continuous batching (model/continuous.py) over a FastBackend's GLM.

    prefill(rows, ids, positions, mask, image_embeds, pre_image) -> logits [N, V]   new prompts into slots
    decode(tokens, positions, index)                             -> logits [n, V]   one token for slots 0..n-1
                                                                   (tokens stay on the device)

Decoding always runs the first n slots (the scheduler hands out the lowest free slots, so the live ones
crowd at the front), padded up to a bucket of slots and of attended length, so that there are few shapes;
on CUDA each (slots, length) bucket is captured once in a CUDA graph and replayed. Prefill does the same
per bucket of prompts and positions (slot_prefill.py). warm_up() captures them all (and the image
encoder's batch sizes) when a server opens its slots, so that no request waits for a capture.
"""
import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..transfer import PinnedRing
from .graphs import record, require_cuda
from .pool import SlotPool
from .slot_prefill import SlotPrefill

log = logging.getLogger("visualglm.fast")

MIN_SPAN = 128                  # smallest attended length bucket
# GPU memory left for activations, logits and captured graphs. With every decode graph captured (up to
# 8 slot x 5 span buckets) this still holds: the graphs share one memory pool, replayed one at a time,
# so their intermediates take the room of the largest one (estimated ~0.2 GB at 128 slots of VisualGLM-6B),
# and they share one logits output [slots, V] fp32 (67 MB at 128 slots) instead of one each (~0.7 GB).
# The prefill graphs (waves of up to 4096 positions, slot_prefill.py) join that pool and are its largest
# (estimated ~0.5 GB of intermediates for VisualGLM-6B). The image encoder's graphs (batches of 1-8) share a
# pool too (estimated ~0.1 GB). Eager prefill of a larger wave takes the rest. warm_up logs what the
# captures took.
RESERVE_BYTES = 2 * 2**30


def _buckets(limit: int, start: int) -> List[int]:
    """start, 2 start, 4 start ... capped by and ending at limit."""
    out, size = [], start
    while size < limit:
        out.append(size)
        size *= 2
    return out + [limit]


class FastSlots:
    def __init__(self, backend, slots: int, length: int, *, cuda_graph: Optional[bool] = None):
        """backend: a FastBackend (its GLM and weights are used as they are); slots sequences of at most
        `length` tokens (prompt + answer) each."""
        if slots < 1 or length < 2:
            raise ValueError(f"need at least one slot of two tokens, got {slots} x {length}")
        self.backend, self.glm = backend, backend.glm
        g = self.glm
        self.pool = SlotPool(g.layers_n, slots, g.heads, length, g.head_dim, backend.dtype, backend.device)
        self.cuda_graph = backend.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.slot_buckets = _buckets(slots, 1)
        self.span_buckets = _buckets(length, min(MIN_SPAN, length))
        self._graphs: Dict[Tuple[int, int], tuple] = {}
        self._graph_pool = None                   # made with the first graph (needs CUDA)
        self._logits: Optional[torch.Tensor] = None   # [slots, V] fp32, every graph's output (see _graph)
        self._ring = PinnedRing()                     # step inputs reach the device without waiting for it
        self.prefiller = SlotPrefill(self)

    @property
    def slots(self) -> int:
        return self.pool.slots

    @property
    def length(self) -> int:
        return self.pool.length

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @classmethod
    def sized(cls, backend, max_batch: int, memory_fraction: float = 0.9, length: Optional[int] = None):
        """Up to max_batch slots of `length` tokens (default: the model's longest sequence). On a GPU, no
        more than fit in memory_fraction of its memory beside what is in use already (the weights) and a
        reserve for activations and graphs."""
        length = length or backend.max_sequence_length
        slots = max_batch
        if backend.device.type == "cuda":
            g = backend.glm
            per_slot = length * SlotPool.bytes_per_token(g.layers_n, g.heads, g.head_dim, backend.dtype)
            free, total = torch.cuda.mem_get_info(backend.device)
            cached = torch.cuda.memory_reserved(backend.device) - torch.cuda.memory_allocated(backend.device)
            budget = memory_fraction * total - (total - free - cached) - RESERVE_BYTES   # torch's cache is free
            slots = min(max_batch, int(budget // per_slot))
            if slots < 1:
                raise MemoryError(f"no GPU memory for even one sequence of {length} tokens "
                                  f"({per_slot / 2**30:.2f} GiB) within --gpu-memory-fraction {memory_fraction}")
        return cls(backend, slots, length)

    def warm_up(self) -> int:
        """Capture the decode step of every (slots, span) bucket, the prefill of every (prompts, positions)
        bucket and the image encoder's batch sizes now, rather than on the first request that needs each (a
        capture takes tens of milliseconds, paid inside that request's latency). Returns the number of
        graphs captured: 0 without CUDA graphs. Raises RuntimeError when CUDA graphs are asked for off a GPU."""
        if not self.cuda_graph:
            return 0
        require_cuda(self.pool.k[0])
        start, before = time.perf_counter(), torch.cuda.memory_allocated(self.device)
        count = len(self._graphs)
        for rows in self.slot_buckets:
            for span in self.span_buckets:
                self._graph(rows, span)
        count = len(self._graphs) - count
        with torch.inference_mode():
            count += self.prefiller.warm_up()
        vision = getattr(self.backend, "vision", None)
        if vision is not None:       # normalised pixels are float32 (model/image.py preprocess)
            count += vision.warm_up((3, *self.backend.image_size), torch.float32, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()     # what the eager warm-ups left cached goes back to the GPU
        log.info("captured %d CUDA graphs in %.1f s (%.2f GiB of GPU memory held by them; %.2f GiB reserved "
                 "by torch in all)", count, time.perf_counter() - start,
                 (torch.cuda.memory_allocated(self.device) - before) / 2**30,
                 torch.cuda.memory_reserved(self.device) / 2**30)
        return count

    # -- the slot interface -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: Sequence[int], ids, positions, mask, image_embeds=None, pre_image=None, pads=None):
        """ids [N, S] left-padded prompts (pads[b] pad tokens in row b), positions [N, 2, S], mask
        [N, 1, S, S] bool -> logits of each prompt's last position [N, V] (fp32). Row b's keys and values
        go to slot rows[b], its real tokens at indices 0 .. S - pads[b] - 1."""
        N, S = ids.shape
        if S > self.length:
            raise ValueError(f"a prompt of {S} tokens does not fit a slot of {self.length}")
        dev = self.device
        mask = mask.to(dev).clone()
        mask[:, 0].diagonal(dim1=-2, dim2=-1).fill_(True)   # pad positions see themselves: no all-masked row
        index = self.pool.prefill_index(pads if pads is not None else [0] * N, S, dev)      # [N, S]
        x = self.glm.embed_tokens(ids.to(dev), image_embeds, pre_image)                   # [N, S, H]
        return self.prefiller(rows, x, positions.to(dev), index, mask)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: Sequence[Tuple[int, int]], index: Sequence[int]):
        """For slots 0..n-1 (n = len(index)): their 2-D positions and the cache index the new token goes
        to (its sequence's length - 1; free slots pass anything, e.g. 0) -> logits [n, V] (fp32). tokens:
        each slot's next input, a tensor [slots] on the device (a continuous batch samples them there: no
        copy through the host) or a list of n."""
        n = len(index)
        rows = next(b for b in self.slot_buckets if b >= n)
        if not torch.is_tensor(tokens):
            tokens = self._ring.to_device(list(tokens) + [0] * (rows - n), torch.long, self.device)
        span = next(s for s in self.span_buckets if s > max(index))
        rest = self._ring.to_device([[p, q, i] for (p, q), i in zip(positions, index)] + [[0, 0, 0]] * (rows - n),
                                    torch.long, self.device)                             # [rows, 3]
        if not self.cuda_graph:
            inputs = torch.cat([tokens[:rows, None], rest], dim=1)                       # [rows, 4]
            return self._step(inputs, self.pool.decode_view(rows, span))[:n]
        graph, static_in, static_out = self._graph(rows, span)
        static_in[:, 0].copy_(tokens[:rows])
        static_in[:, 1:].copy_(rest)
        graph.replay()
        return static_out[:n].clone()          # before the next replay: the output is shared

    # -- graph memory, shared by the decode and prefill graphs ---------------------------------------
    def graph_pool(self):
        """One memory pool for every captured graph: they replay one at a time."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def logits_buffer(self) -> torch.Tensor:
        """[slots, V] fp32: every graph writes its logits here (one output instead of one per graph);
        callers copy them out before the next replay."""
        if self._logits is None:
            self._logits = torch.empty(self.slots, self.glm.vocab_size, dtype=torch.float32, device=self.device)
        return self._logits

    # -- mechanics -----------------------------------------------------------------------------------
    def _step(self, inputs: torch.Tensor, view) -> torch.Tensor:
        """inputs [n, 4] (token, position, block position, cache index) -> logits [n, V]."""
        tokens, positions, index = inputs[:, :1], inputs[:, 1:3, None], inputs[:, 3]
        keys = torch.arange(view.span, device=inputs.device)
        mask = (keys[None] <= index[:, None])[:, None, None]                        # [n, 1, 1, span]
        return self.glm(self.glm.embed_tokens(tokens), positions, view, index, mask)

    def _graph(self, rows: int, span: int):
        key = (rows, span)
        if key not in self._graphs:
            require_cuda(self.pool.k[0])
            # Warm-up and capture run for real: they write at every slot's last index, which no live
            # sequence has reached (one that reaches it ends there) and which stays masked until then.
            static_in = torch.zeros(rows, 4, dtype=torch.long, device=self.device)
            static_in[:, 3] = self.length - 1
            view = self.pool.decode_view(rows, span)
            out = self.logits_buffer()[:rows]          # decode copies it out at once
            graph, _ = record(lambda: out.copy_(self._step(static_in, view)), pool=self.graph_pool())
            self._graphs[key] = (graph, static_in, out)
        return self._graphs[key]
