"""FastBackend: the chat core's backend interface (model/backend.py) over FastGLM.

    encode_image model/hf's plain-torch image encoder over the model's tensors, one CUDA graph per
                 batch size on GPUs (vision.py)
    prefill      the whole prompt batch, keys/values written into cache slots 0..S-1; on CUDA padded
                 to a length bucket and replayed as one graph per bucket (prefill.py, which also says
                 why the prompt of an earlier turn is not reused)
    decode_step  one token per row into slot T-1; on CUDA a captured graph replays the whole step
                 (28 layers, SDPA, LM head) with one launch, so no Python runs per layer
    step_sampler generate()'s sampling step, on CUDA one captured graph too (sampler.py)

The cache is preallocated for the batch and a length bucket (a power of two that covers the longest
`capacity` the caller announced, see _bucket), and reused while those stay the same; a new shape allocates a new
cache and, on CUDA, captures a new graph (only the latest is kept, to bound memory).
"""
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..backend_base import LoadedModelBackend
from . import kernels
from .cache import CacheOverflow, KVCache
from .embedding import quantize_embedding
from .glm import FastGLM
from .graphs import record
from .prefill import BucketedPrefill, bucket_for, pad_right, prefill_mask
from .quant import quantize_glm
from .sampler import SamplerCache
from .vision import FastImageEncoder, shared_image_encoder

log = logging.getLogger("visualglm.fast")

MIN_CACHE = 256


def _compile_options(device: torch.device) -> dict:
    """torch.compile's options for the decode step: where our own kernels launch with PDL (kernels.pdl),
    the LayerNorm and residual kernels that inductor generates between them do too, so that each kernel
    of the step starts while the one before it ends (torch 2.10+ has the option)."""
    import torch._inductor.config as inductor

    return {"triton.enable_pdl": True} if kernels.pdl(device) and hasattr(inductor.triton, "enable_pdl") else {}


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
                 quant: Optional[int] = None, device=None, buckets: Optional[bool] = None):
        """model: a loaded VisualGLM model (its GLM and image encoder weights are shared, not copied).
        quant 8 / 4: the GLM's linear weights and the LM head become int8 / int4 here, the word
        embedding int8 (model/fast/embedding.py), and the loaded model's float copies of them are
        released (the loaded model's own GLM is unusable afterwards; its image encoder keeps working).
        device: where to run, when the model is elsewhere (a model loaded on the CPU): the quantized
        weights are made on it one matrix at a time, then the rest of the model (embeddings, LayerNorms,
        biases, image encoder) moves there, so the device never holds the float GLM.
        compile (default: on CUDA): the decode step goes through torch.compile first, which fuses each
        layer's small element-wise kernels before the graph is captured.
        buckets (default: on CUDA): prefill padded to length buckets, each captured as a graph on CUDA."""
        self.model = model
        self.glm = FastGLM(model).eval()
        if quant:
            quantize_glm(self.glm, quant, release=_release, device=device)
            quantize_embedding(self.glm, release=_release, device=device)
        if device is not None:
            model.to(device)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.compiled = self.cuda_graph if compile is None else compile
        self.buckets = self.cuda_graph if buckets is None else buckets
        self.sample_graph = self.cuda_graph      # generate()'s sampling step replayed as a graph (sampler.py)
        self._samplers = SamplerCache()
        self._decode = (torch.compile(self._step, dynamic=False, options=_compile_options(self.device))
                        if self.compiled else self._step)
        self._cache: Optional[KVCache] = None
        self._graph: Optional[_Graph] = None
        self._prefill: Optional[BucketedPrefill] = None
        try:
            self.vision = FastImageEncoder(shared_image_encoder(model), capture=self.cuda_graph)
        except (ImportError, ValueError, KeyError, AttributeError) as e:  # model/hf can't run it: sat's does
            log.warning("image encoder: sat's eager one (%s)", e)
            self.vision = None

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.glm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.glm.dtype

    # -- the interface (sizes: LoadedModelBackend) ----------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vision is None:
            return super().encode_image(pixels)
        return self.vision(pixels.to(self.device))                            # [B, L, hidden]

    @torch.inference_mode()
    def prefill(self, ids, positions, mask, image_embeds=None, pre_image=None, capacity: Optional[int] = None):
        B, S = ids.shape
        positions, mask = positions.to(self.device), mask.to(self.device)
        # capacity counts a row's own tokens; rows share cache slots after the batch's left padding, so
        # the shortest row, which may generate the most, reaches S + capacity - its length
        shortest = int(mask[:, 0, -1].sum(-1).min()) if capacity else S
        cache = self._cache_for(B, self._bucket(max((capacity or self.max_sequence_length) + S - shortest, S)))
        x = self.glm.embed_tokens(ids.to(self.device), image_embeds, pre_image)       # [B, S, H]
        padded = bucket_for(S, cache.length) if self.buckets else None
        if padded is None:
            full = prefill_mask(mask, S, cache.length)                                 # [B, 1, S, T]
            return self.glm(x, positions, cache, torch.arange(S, device=self.device), full), cache
        full = prefill_mask(mask, padded, cache.length)                                # [B, 1, Sb, T]
        x, positions = pad_right(x, 1, padded), pad_right(positions, 2, padded)
        return self._prefill(x, positions, full, S, padded), cache

    @torch.inference_mode()
    def step_sampler(self, rows, batch: int, vocab: int, generators, ring=None):
        """generate()'s sampling step as a captured graph (sampler.py), or None for the eager one: when
        not capturing, when a row draws from its own generator, or when the capture failed."""
        if not self.sample_graph or any(g is not None for g in generators):
            return None
        return self._samplers.get(rows, batch, vocab, self.device)

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
        """Cache length for `needed` slots: powers of two from MIN_CACHE up to the model's length, then
        steps of half that length (rows batched with a much longer prompt may need more slots than the
        model's length). Few distinct lengths, since each one compiles and captures anew."""
        top = self.max_sequence_length
        if needed > top:
            step = max(top // 2, MIN_CACHE)
            return -(-needed // step) * step
        length = MIN_CACHE
        while length < needed:
            length *= 2
        return min(length, top)

    def _cache_for(self, batch: int, length: int) -> KVCache:
        c = self._cache
        if c is not None and c.batch == batch and c.length == length:
            return c
        self._cache = self._graph = self._prefill = None     # free the old one before allocating
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        g = self.glm
        self._cache = KVCache(g.layers_n, batch, g.heads, length, g.head_dim, self.dtype, self.device)
        if self.cuda_graph:
            self._graph = self._capture(self._cache)
        self._prefill = BucketedPrefill(g, self._cache, capture=self.cuda_graph)
        return self._cache

    def _capture(self, cache: KVCache) -> _Graph:
        """Record one decode step. Warm-up and capture write into slot 0, which prefill overwrites."""
        B, dev = cache.batch, self.device
        tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        positions = torch.zeros(B, 2, 1, dtype=torch.long, device=dev)
        mask = torch.zeros(B, 1, 1, cache.length, dtype=torch.bool, device=dev)
        mask[..., 0] = True
        slot = torch.zeros(1, dtype=torch.long, device=dev)
        graph, logits = record(lambda: self._decode(tokens, positions, mask, slot, cache),
                               warmups=3)                        # (compiles here when compiling)
        return _Graph(graph, tokens, positions, mask, slot, logits)
