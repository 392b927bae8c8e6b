"""VisualGLMForConditionalGeneration: VisualGLM-6B as a transformers PreTrainedModel, no remote code.

State-dict keys are those of THUDM/visualglm-6b (spec 2.3): transformer.* (GLM, HF per-head qkv rows,
a rotary inv_freq buffer per layer), lm_head.weight (untied), image_encoder.{vit,qformer,glm_proj}.*.

forward(input_ids [B, S], position_ids [B, 2, S], attention_mask, pixel_values [B, 3, h, w] or
image_embeds [B, L, hidden], pre_image_length (int or [B]: index of the first image slot, counted from the
first non-pad token; negative = that row has no image), cache) -> logits [B, S, V] and the cache (a
transformers DynamicCache, keys after rotary). attention_mask is either [B, 1, S, T] bool with True =
masked (upstream ChatGLM's convention) or the usual 2-D [B, T] 1/0 left-padding mask; without a 4-D mask
and position_ids, both are built from the ids (model/hf/inputs.py, spec 3.4 / 3.5). The image is read
only while the cache is empty (the prefill), as upstream did.

generate() is transformers' own (GenerationMixin): prepare_inputs_for_generation feeds it the 2-D GLM
positions and the prefix mask at every step, the pixels at the first one only.

chat() / stream_chat() keep upstream's signatures and run on the chat core (model/chat.py ChatEngine)
through HFBackend: the prompt format, sampling and decoding loop are the same as in the sat flavour.
"""
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..defaults import DEMO_SAMPLING
from .configuration import VisualGLMConfig
from ..positions import inverse_frequencies
from .glm import GLMTransformer, RotaryEmbedding
from .inputs import glm_inputs, image_starts, leading_pads
from .vision import ImageEncoder

# The output's cache field: `cache` in recent transformers, `past_key_values` in earlier 5.x releases.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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


class VisualGLMForConditionalGeneration(VisualGLMPreTrainedModel, GenerationMixin):
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

    def embed(self, input_ids, image_embeds=None, pre_image_length=None, pads=None):
        """[B, S] -> [B, S, H], image_embeds [B, L, H] written over the L slots from pads + pre_image_length."""
        x = self.transformer.word_embeddings(input_ids)
        if image_embeds is None:
            return x
        if pre_image_length is None:
            raise ValueError("an image needs pre_image_length: the index of its first placeholder slot in the "
                             "prompt (model.build_inputs_with_image returns it)")
        starts = image_starts(pre_image_length, pads, x.shape[0], x.device)                      # [B]
        x = x.clone()
        L = image_embeds.shape[1]
        for b, start in enumerate(starts.tolist()):
            if start >= 0:
                if start + L > x.shape[1]:
                    raise ValueError(f"the {L} image slots from index {start} do not fit in {x.shape[1]} tokens")
                x[b, start:start + L] = image_embeds[b].to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None, pre_image_length=None, cache: Optional[Cache] = None,
                past_key_values: Optional[Cache] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, images: Optional[torch.Tensor] = None, **kwargs):
        cache = past_key_values if cache is None else cache
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("cache must be a transformers Cache (e.g. DynamicCache), not a tuple of tensors")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        pads = None
        if attention_mask is not None and attention_mask.dim() == 2:        # 1 = token, 0 = left padding
            pads = leading_pads(attention_mask, input_ids)                     # [B]
        if attention_mask is None or attention_mask.dim() == 2:
            if position_ids is None and past:
                raise ValueError("position_ids [B, 2, S] are needed with a filled cache (GLM 2-D positions)")
            if past:
                attention_mask = None if pads is None else (torch.arange(past + input_ids.shape[1], device=pads.device)
                                                            < pads[:, None])[:, None, None, :]    # [B, 1, 1, T]
            else:
                built, attention_mask = glm_inputs(input_ids, self.config, attention_mask)
                position_ids = built if position_ids is None else position_ids
        elif attention_mask.dim() != 4:
            raise ValueError("attention_mask must be [B, T] (1 = token) or [B, 1, S, T] bool (True = masked)")
        elif position_ids is None:
            raise ValueError("position_ids [B, 2, S] must come with a 4-D attention_mask")
        elif attention_mask.dtype != torch.bool:
            attention_mask = attention_mask < 0.5                                # a float 4-D mask of 1 = keep
        pixel_values = images if pixel_values is None else pixel_values          # upstream's name
        if not past and image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_image(pixel_values)
        x = self.embed(input_ids, None if past else image_embeds, pre_image_length, pads)          # [B, S, H]
        hidden = self.transformer(x, position_ids.to(x.device), attention_mask, cache if use_cache else None)
        logits = self.lm_head(hidden)                                                                # [B, S, V]
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache if use_cache else None})

    # -- transformers' generate() ------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None, past_key_values=None,
                                      pixel_values=None, images=None, image_embeds=None, pre_image_length=None,
                                      use_cache=None, **kwargs):
        """One step of generate(): the ids not in the cache yet, their GLM positions and mask rows (built
        from the whole sequence so far), and the image only while the cache is empty."""
        cache = past_key_values if cache is None else cache
        past = cache.get_seq_length() if cache is not None else 0
        positions, masked = glm_inputs(input_ids, self.config, attention_mask, start=past)
        first = past == 0
        if first and pre_image_length is not None:          # the 4-D mask below no longer says where pads are
            pre_image_length = image_starts(pre_image_length, leading_pads(attention_mask, input_ids),
                                            input_ids.shape[0], input_ids.device)
        return dict(input_ids=input_ids[:, past:], position_ids=positions, attention_mask=masked, cache=cache,
                    use_cache=use_cache, pixel_values=pixel_values if first else None,
                    images=images if first else None, image_embeds=image_embeds if first else None,
                    pre_image_length=pre_image_length if first else None)

    def quantize(self, bits: int):
        """Weight-only int8 / int4 of the GLM block linears, in place (model/hf/quantize.py); returns self."""
        from .quantize import quantize_glm
        return quantize_glm(self, bits)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if getattr(self.config, "quantization_bit", None):
            raise ValueError("a quantized model is not saved (its int8 weights would not load back): save the "
                             "float model and call quantize(bits) after loading")
        return super().save_pretrained(save_directory, *args, **kwargs)

    # -- upstream's chat API, on the chat core ---------------------------------------------------------
    def chat_engine(self, tokenizer):
        """The chat core over this model; tokenizer: model/tokenizer.py's or the AutoTokenizer one (its core)."""
        from ..chat import ChatEngine
        from .backend import HFBackend
        if getattr(self, "_hf_backend", None) is None:
            self.__dict__["_hf_backend"] = HFBackend(self)
        return ChatEngine(self.__dict__["_hf_backend"], getattr(tokenizer, "core", tokenizer))

    def build_inputs_with_image(self, tokenizer, image_path: str, query: str,
                                history: Optional[List[Tuple[str, str]]] = None) -> dict:
        """generate() inputs of one chat turn, as upstream's method: input_ids [1, S] of the chat prompt and,
        when image_path is not empty, pixel_values [1, 3, h, w] and pre_image_length."""
        from ..sampling import SamplingParams
        engine = self.chat_engine(tokenizer)
        image = bool(image_path and str(image_path).strip())
        request = engine.make_request(query, history, has_image=image,
                                      params=SamplingParams(max_length=self.config.max_sequence_length))
        inputs = {"input_ids": torch.tensor([request.ids], device=self.device)}
        if image:
            inputs.update(pixel_values=engine.pixels(image_path).to(self.device), pre_image_length=request.pre_image)
        return inputs

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
