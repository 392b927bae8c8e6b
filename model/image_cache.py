"""Batched image encoding with deduplication and a small cache, shared by every front end.

A server batch, a CLI conversation and a batch-inference run all hand their images here as pixels:
identical images (same pixels after preprocessing) are encoded once, the images still missing go
through the backend in one call, and the most recent results stay in an LRU cache, so a client that
sends the same picture with every turn costs one encoding.
"""
import collections
import hashlib
from typing import Dict, List, Optional, Sequence

import torch

from .image import normalize


def pixels_key(pixels: torch.Tensor) -> str:
    """A digest of preprocessed pixels [.., 3, H, W], normalised (float) or still bytes (uint8, see
    model.image.pixels_uint8): equal keys mean equal model input. Bytes hash as they are (a quarter of
    the float tensor's size)."""
    pixels = pixels.detach().cpu().contiguous()
    if pixels.dtype == torch.uint8:
        return "u8:" + hashlib.sha1(pixels.numpy().tobytes()).hexdigest()
    return hashlib.sha1(pixels.float().numpy().tobytes()).hexdigest()


class ImageEncoder:
    def __init__(self, backend, cache_size: int = 16):
        self.backend = backend
        self.cache_size = cache_size
        self._cache: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
        self.stats = dict(images_encoded=0, image_cache_hits=0)

    def encode(self, pixels: Sequence[torch.Tensor], keys: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
        """pixels: one [1, 3, H, W] (or [3, H, W]) tensor per image, normalised or uint8 (normalised here, on
        the model's device) -> one embedding [L, hidden] each.
        keys (from pixels_key) may be passed when the caller computed them already."""
        pixels = [p if p.dim() == 4 else p[None] for p in pixels]
        keys = list(keys) if keys is not None else [pixels_key(p) for p in pixels]
        found: Dict[str, torch.Tensor] = {}
        missing: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
        for key, p in zip(keys, pixels):
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
                self.stats["image_cache_hits"] += 1
            elif key not in found:
                missing.setdefault(key, p)
        if missing:
            device = self.backend.device
            batch = [p.to(device) if p.is_floating_point() else normalize(p.to(device)) for p in missing.values()]
            encoded = self.backend.encode_image(torch.cat(batch))                           # [N, L, hidden]
            self.stats["images_encoded"] += len(missing)
            for key, emb in zip(missing, encoded):
                found[key] = emb
                self._remember(key, emb)
        return [found[key] for key in keys]

    def _remember(self, key: str, emb: torch.Tensor) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
