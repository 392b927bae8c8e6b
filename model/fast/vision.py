"""The image encoder of the fast path: model/hf's plain-torch EVA ViT + Q-Former over the loaded model's
own tensors (nothing copied), captured in a CUDA graph per batch size on GPUs.

Why not sat's encoder as it is: its attention asks the host whether the mask is full in every layer
(`(mask > 0).all()` in a Python `if`), which waits for the GPU in each of the 51 layers and cannot be
captured.
model/hf/vision.py computes the same function (spec 4) with no host round trip, and its parameter names
are sat's after `mixins.eva.model.`, so its modules can be pointed at the sat tensors one by one.

    pixels [N, 3, 224, 224] -> chunks of 16 -> each replays the graph of its own batch size (1 to 16)
                            -> [N, 32, 4096]

A wave of many images goes through in chunks of the largest captured batch: the encoder is compute-bound
from a few images on (on an H200: 1.22 ms per image in a batch of 8, 1.15 in one of 16), so chunks cost
about what one big eager batch does, while every shape stays one that was captured at start-up
(FastSlots.warm_up): a new wave size meets no new allocation, and no kernel is launched from Python.
"""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch

from .graphs import try_record

# captured batch sizes, every one up to 16: a wave of 13 images is one call of 13 (each call costs ~2.7 ms
# besides its images on an H200: 14.9 ms, against 9.8 + 6.9 for 8 + 5), not 16 with 3 blank ones (the encoder
# is compute-bound, a padded image costs as much as a real one); more go in chunks of the largest
BATCHES = tuple(range(1, 17))


def shared_image_encoder(model):
    """model/hf's ImageEncoder whose parameters are the loaded sat model's own (same objects: moving or
    quantizing the model is seen here too). Raises ValueError when the two do not name the same tensors."""
    from ..hf.vision import ImageEncoder
    blip = model.get_mixin("eva").model
    c = model.config
    config = SimpleNamespace(eva_config=c["eva_args"], qformer_config=c["qformer_args"],
                             image_length=model.image_length, hidden_size=c["hidden_size"])
    with torch.device("meta"):                               # shapes only: the tensors come from the model
        encoder = ImageEncoder(config)
    theirs = dict(blip.named_parameters())
    ours = [name for name, _ in encoder.named_parameters()]
    if set(ours) != set(theirs) or any(True for _ in encoder.buffers()):
        only_ours, only_theirs = sorted(set(ours) - set(theirs))[:3], sorted(set(theirs) - set(ours))[:3]
        raise ValueError(f"the plain-torch image encoder does not match this model's: only in ours "
                         f"{only_ours}, only in the model's {only_theirs}")
    for name in ours:
        owner, _, attr = name.rpartition(".")
        setattr(encoder.get_submodule(owner), attr, theirs[name])
    return encoder.eval()


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    pixels: torch.Tensor       # [b, 3, H, W]      static input
    out: torch.Tensor          # [b, L, hidden]    static output


class FastImageEncoder:
    """pixels [N, 3, H, W] on the model's device -> [N, L, hidden]; capture: one CUDA graph per batch size
    of BATCHES (recorded by warm_up or on first use), larger batches in chunks of the largest; else eager
    (also after a capture failed, with a warning)."""

    def __init__(self, encoder, capture: bool):
        self.encoder, self.capture = encoder, capture
        self.graphs: Dict[int, _Graph] = {}
        self._pool = None          # one memory pool for all sizes: replays run one at a time

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] > BATCHES[-1] and (self.capture or self.graphs):
            return torch.cat([self._encode(chunk) for chunk in pixels.split(BATCHES[-1])])
        return self._encode(pixels)

    def warm_up(self, shape: Tuple[int, ...], dtype: torch.dtype, device) -> int:
        """Record every batch size of BATCHES for pixels of `shape` [3, H, W] now; returns how many were
        recorded (0 when not capturing or when a capture failed)."""
        like = torch.empty(1, *shape, dtype=dtype, device=device)
        count = 0
        for batch in BATCHES:
            if self.capture and batch not in self.graphs:
                count += self._record(batch, like) is not None
        return count

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        batch = next((b for b in BATCHES if n <= b), None)
        g = self.graphs.get(batch) or (self._record(batch, pixels) if self.capture and batch else None)
        if g is None:
            return self.encoder(pixels)
        g.pixels[:n].copy_(pixels)
        g.pixels[n:].zero_()                                  # rows are independent: pads change nothing
        g.graph.replay()
        return g.out[:n].clone()                              # before another size's replay reuses the pool

    def _record(self, batch: int, like: torch.Tensor) -> Optional[_Graph]:
        pixels = torch.zeros(batch, *like.shape[1:], dtype=like.dtype, device=like.device)
        recorded = try_record(lambda: self.encoder(pixels), pixels, "image encoder", self._pool_handle)
        if recorded is None:
            self.capture = False
            return None
        graph, out = recorded
        g = self.graphs[batch] = _Graph(graph, pixels, out)
        return g

    def _pool_handle(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool
