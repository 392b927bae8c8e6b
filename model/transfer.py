"""Small copies between the host and a GPU that never make the host wait for the GPU.

A decoding loop that runs ahead (generation.py, continuous.py) keeps the GPU busy only if nothing in a
step blocks the host until the GPU has caught up. Three ordinary idioms do block: `torch.tensor(list,
device="cuda")` and `t[index] = True` (each copies from pageable host memory, which waits for the GPU),
and `.tolist()` of a GPU tensor. On an H200 the second of them in the batch-1 loop made the host wait on
every token: of a 4.66 ms fp16 token the host spent 0.01 ms waiting for the sampled tokens, i.e. it never
got ahead of the GPU (CUDA's sync debug mode found the line; docs/benchmarks.md).

PinnedRing owns a few page-locked host buffers, allocated once and used in turn: a list goes to the
device through one of them (an asynchronous copy), and a device tensor comes back into one (HostCopy,
waited for only when its values are needed). Each buffer remembers the event of its last copy and is
reused only after it (with a ring this deep, long after). Off CUDA both are plain tensors.
"""
from typing import List, Optional

import torch


class HostCopy:
    """Values being copied into a host tensor: wait() returns them once the copy is done. It waits on an
    event, which releases the GIL (a server's event loop thread keeps running; .tolist() of a GPU tensor
    would hold it for the whole wait)."""

    def __init__(self, host: torch.Tensor, done: Optional["torch.cuda.Event"] = None):
        self._host, self._done = host, done
        self.read = False

    def wait(self) -> list:
        if self._done is not None:
            self._done.synchronize()
        self.read = True
        return self._host.tolist()


class PinnedRing:
    def __init__(self, depth: int = 8):
        """depth: buffers used in turn. A loop running one step ahead makes a few copies per step and reads
        each copy to the host within a step; one still unread when its buffer comes round again keeps that
        buffer, and the ring allocates another."""
        self._buffers: List[Optional[torch.Tensor]] = [None] * depth    # uint8, page-locked
        self._events: List[Optional["torch.cuda.Event"]] = [None] * depth
        self._readers: List[Optional[HostCopy]] = [None] * depth       # the copy each buffer holds for
        self._next = 0

    def to_device(self, values, dtype: torch.dtype, device) -> torch.Tensor:
        """A (nested) list of numbers as a tensor on `device`, without waiting for the GPU."""
        device = torch.device(device)
        host = torch.tensor(values, dtype=dtype)
        if device.type != "cuda":
            return host.to(device)
        slot, buffer = self._take(host)
        buffer.copy_(host)
        out = buffer.to(device, non_blocking=True)
        self._record(slot, device)
        return out

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        """Start copying a device tensor to the host; HostCopy.wait() gives its values."""
        if not tensor.is_cuda:
            return HostCopy(tensor)
        slot, buffer = self._take(tensor)
        buffer.copy_(tensor, non_blocking=True)
        copy = self._readers[slot] = HostCopy(buffer, self._record(slot, tensor.device))
        return copy

    def _take(self, like: torch.Tensor):
        """The next buffer, as a tensor of like's shape and dtype (grown when too small)."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        reader, self._readers[slot] = self._readers[slot], None
        if reader is not None and not reader.read:   # not read yet (or never will be): it keeps its buffer
            self._buffers[slot] = self._events[slot] = None
        if self._events[slot] is not None:
            self._events[slot].synchronize()         # its last copy, queued `depth` copies ago, is done
        nbytes = like.numel() * like.element_size()
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[slot] = torch.empty(max(nbytes, 512), dtype=torch.uint8, pin_memory=True)
        return slot, buffer[:nbytes].view(like.dtype).view(like.shape)

    def _record(self, slot: int, device) -> "torch.cuda.Event":
        event = self._events[slot] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event
