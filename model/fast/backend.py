"""FastBackend: the chat core's backend interface (model/backend.py) over FastGLM.

    prefill      eager: the whole prompt batch, keys/values written into cache slots 0..S-1
    decode_step  one token per row into slot T-1; on CUDA a captured graph replays the whole step
                 (28 layers, SDPA, LM head) with one launch, so no Python runs per layer

The cache is preallocated for the batch and a length bucket (a power of two that covers the longest
`capacity` the caller announced), and reused while those stay the same; a new shape allocates a new
cache and, on CUDA, captures a new graph (only the latest is kept, to bound memory).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..backend_base import LoadedModelBackend
from .cache import CacheOverflow, KVCache
from .glm import FastGLM
from .quant import quantize_glm

MIN_CACHE = 256


def _release(weight: torch.Tensor) -> None:
    """Free a float weight that now lives on quantized (the Parameter object stays, empty)."""
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor       # [B, 1]       static inputs, copied into before each replay
    positions: torch.Tensor    # [B, 2, 1]
    mask: torch.Tensor         # [B, 1, 1, T]
    slot: torch.Tensor         # [1]
    logits: torch.Tensor       # [B, V]       static output


class FastBackend(LoadedModelBackend):
    def __init__(self, model, *, cuda_graph: Optional[bool] = None, compile: Optional[bool] = None,
                 quant: Optional[int] = None):
        """model: a loaded VisualGLM model (its image encoder runs as it is; its GLM weights are shared).
        quant 8 / 4: the GLM's linear weights and the LM head become int8 / int4 here, and the loaded
        model's float copies of them are released (the loaded model's own GLM is unusable afterwards;
        its image encoder keeps working). compile (default: on CUDA): the decode step goes through
        torch.compile first, which fuses each layer's small element-wise kernels before the graph is captured."""
        self.model = model
        self.glm = FastGLM(model).eval()
        if quant:
            quantize_glm(self.glm, quant, release=_release)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.compiled = self.cuda_graph if compile is None else compile
        self._decode = torch.compile(self._step, dynamic=False) if self.compiled else self._step
        self._cache: Optional[KVCache] = None
        self._graph: Optional[_Graph] = None

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.glm.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.glm.embed.dtype

    # -- the interface (sizes and encode_image: LoadedModelBackend) --------------------------------
    @torch.inference_mode()
    def prefill(self, ids, positions, mask, image_embeds=None, pre_image=None, capacity: Optional[int] = None):
        B, S = ids.shape
        cache = self._cache_for(B, self._bucket(max(capacity or self.max_sequence_length, S)))
        full = torch.zeros(B, 1, S, cache.length, dtype=torch.bool, device=self.device)
        full[..., :S] = mask.to(self.device)
        full[:, 0].diagonal(dim1=-2, dim2=-1).fill_(True)   # pad rows see themselves: no all-masked rows, no NaN
        x = self.glm.embed_tokens(ids.to(self.device), image_embeds, pre_image)
        slots = torch.arange(S, device=self.device)
        return self.glm(x, positions.to(self.device), cache, slots, full), cache

    @torch.inference_mode()
    def decode_step(self, tokens, positions, key_mask, cache: KVCache):
        if cache is not self._cache:
            raise RuntimeError("This conversation's cache was replaced by a newer prefill on the same backend.")
        T = key_mask.shape[1]
        if T > cache.length:
            raise CacheOverflow(f"The sequence reached {T} tokens, past the {cache.length} this cache holds "
                                f"(prefill's capacity); raise max_length / capacity.")
        if self.cuda_graph:
            g = self._graph
            g.tokens.copy_(tokens)
            g.positions.copy_(positions)
            g.mask.zero_()
            g.mask[:, 0, 0, :T].copy_(key_mask)
            g.slot.fill_(T - 1)
            g.graph.replay()
            return g.logits.clone(), cache
        mask = torch.zeros(key_mask.shape[0], 1, 1, cache.length, dtype=torch.bool, device=self.device)
        mask[:, 0, 0, :T] = key_mask
        slot = torch.tensor([T - 1], device=self.device)
        return self._decode(tokens, positions, mask, slot, cache), cache

    # -- mechanics -----------------------------------------------------------------------------------
    def _step(self, tokens, positions, mask, slot, cache):
        return self.glm(self.glm.embed_tokens(tokens), positions, cache, slot, mask)

    def _bucket(self, needed: int) -> int:
        length = MIN_CACHE
        while length < needed:
            length *= 2
        return min(length, max(self.max_sequence_length, needed))

    def _cache_for(self, batch: int, length: int) -> KVCache:
        c = self._cache
        if c is not None and c.batch == batch and c.length == length:
            return c
        self._cache = self._graph = None                     # free the old one before allocating
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        g = self.glm
        self._cache = KVCache(g.layers_n, batch, g.heads, length, g.head_dim, self.dtype, self.device)
        if self.cuda_graph:
            self._graph = self._capture(self._cache)
        return self._cache

    def _capture(self, cache: KVCache) -> _Graph:
        """Record one decode step. Warm-up and capture write into slot 0, which prefill overwrites."""
        B, dev = cache.batch, self.device
        tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        positions = torch.zeros(B, 2, 1, dtype=torch.long, device=dev)
        mask = torch.zeros(B, 1, 1, cache.length, dtype=torch.bool, device=dev)
        mask[..., 0] = True
        slot = torch.zeros(1, dtype=torch.long, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):                                   # (compiles here when compiling)
                self._decode(tokens, positions, mask, slot, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode(tokens, positions, mask, slot, cache)
        return _Graph(graph, tokens, positions, mask, slot, logits)
