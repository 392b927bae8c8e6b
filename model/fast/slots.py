"""FastSlots: the slot interface of continuous batching (model/continuous.py) over a FastBackend's GLM.

    prefill(rows, ids, positions, mask, image_embeds, pre_image) -> logits [N, V]   new prompts into slots
    decode(tokens, positions, index)                             -> logits [n, V]   one token for slots 0..n-1

Decoding always runs the first n slots (the scheduler hands out the lowest free slots, so the live ones
crowd at the front), padded up to a bucket of slots and of attended length, so that there are few shapes;
on CUDA each (slots, length) bucket is captured once in a CUDA graph and replayed. Prefill runs eagerly.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .graphs import record
from .pool import SlotPool

MIN_SPAN = 128                  # smallest attended length bucket
RESERVE_BYTES = 2 * 2**30       # GPU memory left for activations, logits and captured graphs


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
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None

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
        view = self.pool.prefill_view(torch.as_tensor(list(rows), device=dev))
        x = self.glm.embed_tokens(ids.to(dev), image_embeds, pre_image)
        return self.glm(x, positions.to(dev), view, index, mask)

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[Tuple[int, int]], index: Sequence[int]):
        """For slots 0..n-1: the new token, its 2-D position and the cache index it goes to (its
        sequence's length - 1; free slots pass anything, e.g. 0) -> logits [n, V] (fp32)."""
        n = len(tokens)
        rows = next(b for b in self.slot_buckets if b >= n)
        span = next(s for s in self.span_buckets if s > max(index))
        pad = rows - n
        host = torch.tensor([[t, p, q, i] for t, (p, q), i in zip(tokens, positions, index)] + [[0, 0, 0, 0]] * pad)
        inputs = host.to(self.device, non_blocking=True)                               # [rows, 4]
        if not self.cuda_graph:
            return self._step(inputs, self.pool.decode_view(rows, span))[:n]
        graph, static_in, static_out = self._graph(rows, span)
        static_in.copy_(inputs)
        graph.replay()
        return static_out[:n].clone()

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
            # Warm-up and capture run for real: they write at every slot's last index, which no live
            # sequence has reached (one that reaches it ends there) and which stays masked until then.
            static_in = torch.zeros(rows, 4, dtype=torch.long, device=self.device)
            static_in[:, 3] = self.length - 1
            view = self.pool.decode_view(rows, span)
            graph, static_out = record(lambda: self._step(static_in, view), pool=self._graph_pool)
            self._graphs[key] = (graph, static_in, static_out)
        return self._graphs[key]
