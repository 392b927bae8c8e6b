"""Samples into batches: padding and the GLM mask (collate), and an order of micro-batches that a
resumed run can continue from a step number alone (BatchOrder, make_loader)."""
import functools
from typing import Dict, List

import numpy as np
import torch

from .data import IGNORE


def collate(rows: List[dict], pad_id: int) -> dict:
    """Right-pad to the longest row; positions and the GLM mask (spec 3.4/3.5) for each row."""
    from model.positions import glm_attention_mask, glm_positions
    total = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), total), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), total), IGNORE, dtype=torch.long)
    positions = torch.zeros(len(rows), 2, total, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        positions[b, :, :n] = glm_positions(r["context_length"], n)
    contexts = [r["context_length"] for r in rows]
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions,
             "attention_mask": glm_attention_mask(contexts, [0] * len(rows), total),
             "pre_image": torch.tensor([r["pre_image"] if r["image"] is not None else -1 for r in rows])}
    images = [r["image"] for r in rows]
    if any(i is not None for i in images):
        ref = next(i for i in images if i is not None)
        batch["image"] = torch.stack([i if i is not None else torch.zeros_like(ref) for i in images])
    return batch


class BatchOrder:
    """Reproducible endless order of a dataset, reshuffled each epoch (seed + epoch), cut into
    micro-batches for each data-parallel rank. Micro-batch `step` of a rank depends on nothing else,
    so resuming only needs the step number."""

    def __init__(self, size: int, batch_size: int, world: int, rank: int, seed: int, shuffle: bool = True):
        self.size, self.batch_size, self.world, self.rank = size, batch_size, world, rank
        self.seed, self.shuffle = seed, shuffle
        self._perms: Dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            self._perms = {epoch: np.random.RandomState(self.seed + epoch).permutation(self.size)}
        return int(self._perms[epoch][offset])

    def batch(self, step: int) -> List[int]:
        start = (step * self.world + self.rank) * self.batch_size
        return [self._index(start + i) for i in range(self.batch_size)]


class _Steps(torch.utils.data.Sampler):
    def __init__(self, order: BatchOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self):
        return (self.order.batch(s) for s in range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


def make_loader(dataset, order: BatchOrder, start: int, stop: int, pad_id: int, workers: int):
    """Micro-batches `start` to `stop` (exclusive) of `order`, collated, from `workers` processes."""
    # its own generator: creating the loader must not draw from the global RNG (dropout), so that a
    # resumed run continues the random stream it saved
    return torch.utils.data.DataLoader(dataset, batch_sampler=_Steps(order, start, stop), num_workers=workers,
                                       collate_fn=functools.partial(collate, pad_id=pad_id),
                                       generator=torch.Generator().manual_seed(order.seed + start),
                                       pin_memory=torch.cuda.is_available())
