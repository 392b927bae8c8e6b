"""VisualGLMForConditionalGeneration: VisualGLM-6B as a transformers PreTrainedModel, no remote code.

State-dict keys are those of THUDM/visualglm-6b (spec 2.3): transformer.* (GLM, HF per-head qkv rows,
a rotary inv_freq buffer per layer), lm_head.weight (untied), image_encoder.{vit,qformer,glm_proj}.*.

forward(input_ids [B, S], position_ids [B, 2, S], attention_mask [B, 1, S, T] bool with True = masked
(upstream's convention), pixel_values [B, 3, h, w] or image_embeds [B, L, hidden], pre_image_length
(int or [B]: index of the first image slot; negative = that row has no image), past_key_values)
-> logits [B, S, V] and `.cache` (a tuple over layers of (k, v) [B, nh, T, hd]). Without position_ids
and attention_mask (and without a cache) both are built from the ids as in spec 3.4 / 3.5.

chat() / stream_chat() keep upstream's signatures and run on the chat core (model/chat.py ChatEngine)
through HFBackend: the prompt format, sampling and decoding loop are the same as in the sat flavour.
"""
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..defaults import DEMO_SAMPLING
from .configuration import VisualGLMConfig
from ..positions import inverse_frequencies
from .glm import GLMTransformer, RotaryEmbedding
from .vision import ImageEncoder


def glm_inputs(input_ids: torch.Tensor, config) -> Tuple[torch.Tensor, torch.Tensor]:
    """Position ids [B, 2, S] and the mask [B, 1, S, S] (True = masked) of unpadded rows laid out as
    [context ... [gMASK] | <sop> answer ...] (spec 3.4 / 3.5); the context ends at the first <sop>."""
    B, S = input_ids.shape
    idx = torch.arange(S, device=input_ids.device)
    positions = torch.zeros(B, 2, S, dtype=torch.long, device=input_ids.device)
    masked = torch.zeros(B, 1, S, S, dtype=torch.bool, device=input_ids.device)
    for b, row in enumerate(input_ids.tolist()):
        c = row.index(config.bos_token_id) if config.bos_token_id in row else S
        mark = config.gmask_token_id if config.gmask_token_id in row else config.mask_token_id
        mpos = row.index(mark) if mark in row else max(c - 1, 0)
        positions[b, 0] = torch.where(idx < c, idx, torch.full_like(idx, mpos))
        positions[b, 1] = torch.clamp(idx - c + 1, min=0)
        masked[b, 0] = ~((idx[None, :] < c) | (idx[None, :] <= idx[:, None]))
    return positions, masked


class VisualGLMPreTrainedModel(PreTrainedModel):
    config_class = VisualGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["GLMBlock", "EncoderBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(inverse_frequencies(module.inv_freq.shape[0] * 2, module.inv_freq.device))
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            module.weight.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class VisualGLMForConditionalGeneration(VisualGLMPreTrainedModel):
    def __init__(self, config: VisualGLMConfig):
        super().__init__(config)
        self.transformer = GLMTransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.image_encoder = ImageEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.image_encoder.vit.image_size)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] normalised pixels -> [B, image_length, hidden] in the GLM's dtype."""
        return self.image_encoder(pixel_values).to(self.transformer.word_embeddings.weight.dtype)

    def embed(self, input_ids, image_embeds=None, pre_image_length=None):
        """[B, S] -> [B, S, H], image_embeds [B, L, H] written over the L slots from pre_image_length."""
        x = self.transformer.word_embeddings(input_ids)
        if image_embeds is None or input_ids.shape[1] < image_embeds.shape[1]:
            return x
        starts = torch.as_tensor(pre_image_length if pre_image_length is not None else 0).expand(x.shape[0])
        x = x.clone()
        for b, start in enumerate(starts.tolist()):
            if start >= 0:
                x[b, start:start + image_embeds.shape[1]] = image_embeds[b].to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None, pre_image_length=None,
                past_key_values: Optional[tuple] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, cache: Optional[tuple] = None, **kwargs):
        past_key_values = cache if past_key_values is None else past_key_values
        if past_key_values is None and (position_ids is None or attention_mask is None):
            positions, masked = glm_inputs(input_ids, self.config)
            position_ids = positions if position_ids is None else position_ids
            attention_mask = masked if attention_mask is None else attention_mask
        elif position_ids is None:
            raise ValueError("position_ids [B, 2, S] are needed with past_key_values (GLM 2-D positions)")
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError("attention_mask must be [B, 1, S, T] bool, True = masked (upstream ChatGLM's convention)")
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask < 0.5        # a float mask of 1 = keep
        if image_embeds is None and pixel_values is not None and past_key_values is None:
            image_embeds = self.encode_image(pixel_values)
        x = self.embed(input_ids, image_embeds if past_key_values is None else None, pre_image_length)
        hidden, presents = self.transformer(x, position_ids.to(x.device), attention_mask, past_key_values)
        logits = self.lm_head(hidden)                                                  # [B, S, V]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return CausalLMOutputWithPast(logits=logits, cache=presents if use_cache else None)   # .cache (transformers 5)

    def quantize(self, bits: int):
        """Weight-only int8 / int4 of the GLM block linears, in place (model/hf/quantize.py); returns self."""
        from .quantize import quantize_glm
        return quantize_glm(self, bits)

    # -- upstream's chat API, on the chat core ---------------------------------------------------------
    def chat_engine(self, tokenizer):
        from ..chat import ChatEngine
        from .backend import HFBackend
        if getattr(self, "_hf_backend", None) is None:
            self.__dict__["_hf_backend"] = HFBackend(self)
        return ChatEngine(self.__dict__["_hf_backend"], tokenizer)

    def stream_chat(self, tokenizer, image_path: str, query: str, history: Optional[List[Tuple[str, str]]] = None,
                    max_length: int = DEMO_SAMPLING["max_length"], min_length: Optional[int] = None,
                    do_sample: bool = True, top_p: float = DEMO_SAMPLING["top_p"], top_k: int = DEMO_SAMPLING["top_k"],
                    temperature: float = DEMO_SAMPLING["temperature"],
                    repetition_penalty: float = DEMO_SAMPLING["repetition_penalty"], logits_processor=None,
                    english: bool = False, generator=None, max_new_tokens: Optional[int] = None, **kwargs):
        """Yield (response so far, history); the last yield has the whole answer in the history. An empty
        image_path means a text-only chat. do_sample=False is greedy. Sampling follows the chat core
        (model/sampling.py, sat's rules); min_length and logits_processor are not supported."""
        if logits_processor is not None:
            raise NotImplementedError("logits_processor is not supported: sampling runs in model/sampling.py")
        if min_length:
            warnings.warn("min_length is ignored: the chat core stops at <eop> like the sat flavour")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        from ..sampling import SamplingParams
        params = SamplingParams(max_length=max_length, top_p=top_p, top_k=top_k if do_sample else 1,
                                temperature=temperature, repetition_penalty=repetition_penalty,
                                max_new_tokens=max_new_tokens)
        image = image_path if image_path and str(image_path).strip() else None
        for response, new_history, _ in self.chat_engine(tokenizer).stream_chat(
                image, query, history=history, english=english, generator=generator, params=params):
            yield response, new_history

    def chat(self, tokenizer, image_path: str, query: str, history: Optional[List[Tuple[str, str]]] = None, **kw):
        """(response, history + [(query, response)]), as upstream's HF chat()."""
        final = None
        for final in self.stream_chat(tokenizer, image_path, query, history=history, **kw):
            pass
        return final
