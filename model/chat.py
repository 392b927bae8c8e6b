"""The chat engine: prompt building, image handling, generation and post-processing (spec 6).

Every front end (CLI, web, API, batch) goes through `ChatEngine`, which drives a backend
(model/backend.py) and knows nothing of how the model is implemented; `chat()` and `stream_chat()`
keep the original function signatures on top of it. The image is encoded once: `chat()` returns the
embeddings as its third value, and a later turn that passes them back as `image=` reuses them.
"""
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from .backend import as_backend
from .defaults import CHAT_SAMPLING, IMAGE_CACHE_SIZE
from .generation import Request, generate
from .image import load_image, preprocess
from .image_cache import ImageEncoder
from .prompts import History, PromptTooLongError, ResponseStream, build_prompt, encode_prompt, process_response
from .sampling import SamplingParams


def _answer_text(text: str, final: bool, process: Callable[[str], str] = process_response) -> str:
    """Decoded text -> the answer as shown: an unfinished multi-byte character (streaming) dropped, then
    the original's post-processing (`process`: process_response, or a ResponseStream doing the same)."""
    if not final:
        text = text.rstrip("\ufffd")
    return process(text)


class ChatEngine:
    def __init__(self, model, tokenizer, *, allow_image_paths: bool = True, allow_image_urls: bool = True,
                 image_cache_size: int = IMAGE_CACHE_SIZE, backend: str = "auto"):
        """model: a backend, or a loaded model (a sat VisualGLMModel) that as_backend wraps; backend
        "auto" (fast on a GPU), "fast" or "sat" (the reference path), see model/backend.py."""
        self.model = model
        self.backend = as_backend(model, backend)
        self.tokenizer = tokenizer
        self.allow_image_paths = allow_image_paths
        self.allow_image_urls = allow_image_urls
        self.images = ImageEncoder(self.backend, image_cache_size)

    @property
    def device(self):
        return self.backend.device

    @property
    def image_length(self) -> int:
        return self.backend.image_length

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + answer) the model takes."""
        return self.backend.max_sequence_length

    # -- images -------------------------------------------------------------------------------
    def pixels(self, source) -> torch.Tensor:
        """Path / URL / bytes / PIL image -> normalised pixels [1, 3, H, W] on the CPU; pixel tensors
        ([3, H, W] or [1, 3, H, W]) pass through. Paths and URLs only where this engine allows them."""
        if isinstance(source, torch.Tensor):
            return source if source.dim() == 4 else source[None]
        img = load_image(source, allow_path=self.allow_image_paths, allow_url=self.allow_image_urls)
        return preprocess(img, self.backend.image_size)

    @torch.inference_mode()
    def encode_images(self, pixels: Sequence[torch.Tensor], keys: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
        """Pixels of several images -> embeddings [L, hidden] each: one backend call for the images not
        seen recently, identical images once (see model/image_cache.py)."""
        return self.images.encode(pixels, keys)

    def encode_image(self, source) -> torch.Tensor:
        """Path / URL / bytes / PIL image / pixels [1, 3, H, W] -> embeddings [1, L, hidden]. Embeddings
        (3-D) pass through unchanged, so an image returned by chat() can be given back."""
        if isinstance(source, torch.Tensor) and source.dim() == 3:
            return source
        return self.encode_images([self.pixels(source)])[0][None]

    # -- prompts --------------------------------------------------------------------------------
    def make_request(self, query: str, history: Optional[History] = None, image_embeds=None, english: bool = False,
                     params: Optional[SamplingParams] = None, generator=None, *, has_image: bool = None) -> Request:
        """A Request for the engine's generate(). image_embeds [1, L, hidden] or [L, hidden]; or
        has_image=True to leave the image slots for embeddings attached later (the server encodes a
        whole batch's images at once). Raises PromptTooLongError when no answer would fit."""
        params = params or SamplingParams()
        has_image = image_embeds is not None if has_image is None else has_image
        prompt = build_prompt(query, history, english=english, image=has_image)
        ids, pre_image = encode_prompt(self.tokenizer, prompt, self.image_length if has_image else 0)
        if len(ids) >= params.max_length:
            raise PromptTooLongError(
                f"The prompt is {len(ids)} tokens, which leaves no room for an answer within max_length="
                f"{params.max_length}. Shorten the question, clear the history, or raise max_length.")
        if image_embeds is not None and image_embeds.dim() == 3:
            image_embeds = image_embeds[0]
        return Request(ids=ids, params=params, pre_image=pre_image, generator=generator, image_embeds=image_embeds)

    def decode(self, ids: Sequence[int], final: bool = True) -> str:
        return _answer_text(self.tokenizer.decode(list(ids)), final)

    def streaming_decode(self) -> Callable[..., str]:
        """decode() for one answer while it is streamed (every call passes all its ids so far): with a
        tokenizer that has a streaming_decoder (model/tokenizer.py), a call costs the same at the 500th
        token as at the 5th. The final text (final=True) is decoded whole."""
        make = getattr(self.tokenizer, "streaming_decoder", None)
        if make is None:
            return self.decode
        stream, response = make(), ResponseStream()

        def decode(ids: Sequence[int], final: bool = True) -> str:
            return self.decode(ids, final) if final else _answer_text(stream.decode(ids), final, response)
        return decode

    def eos_ids(self) -> List[int]:
        return [self.tokenizer.eos_token_id]

    def generate(self, requests: Sequence[Request], *, isolate_errors: bool = False):
        """Per step, the new token of every request (see model.generation.generate)."""
        return generate(self.backend, requests, self.tokenizer.pad_token_id, self.eos_ids(),
                        isolate_errors=isolate_errors)

    # -- chat -----------------------------------------------------------------------------------
    def stream_chat(self, image_path, query: str, history: Optional[History] = None, image=None,
                    english: bool = False, generator=None, params: Optional[SamplingParams] = None,
                    **sampling) -> Iterator[Tuple[str, History, Optional[torch.Tensor]]]:
        """Yield (response so far, history, image embeddings); the last yield is the final answer.
        Sampling settings come as `params` or as SamplingParams keyword arguments."""
        history = list(history or [])
        params = params or SamplingParams(**sampling)
        source = image if image is not None else (image_path if image_path not in (None, "") else None)
        image_embeds = self.encode_image(source) if source is not None else None
        request = self.make_request(query, history, image_embeds, english, params, generator)
        out: List[int] = []
        decode = self.streaming_decode()
        for step in self.generate([request]):
            out.append(step[0])
            yield decode(out, final=False), history, image_embeds
        response = decode(out)
        yield response, history + [(query, response)], image_embeds

    def chat(self, image_path, query: str, history: Optional[History] = None, image=None, **kw):
        final = None
        for final in self.stream_chat(image_path, query, history=history, image=image, **kw):
            pass
        return final


def _params(max_length, top_p, top_k, temperature, repetition_penalty, invalid_slices) -> SamplingParams:
    return SamplingParams(max_length=max_length, top_p=top_p, top_k=top_k, temperature=temperature,
                          repetition_penalty=repetition_penalty, invalid_slices=list(invalid_slices))


def chat(image_path, model, tokenizer, query: str, history: Optional[History] = None, image=None,
         max_length: int = CHAT_SAMPLING["max_length"], top_p: float = CHAT_SAMPLING["top_p"],
         top_k: int = CHAT_SAMPLING["top_k"], temperature: float = CHAT_SAMPLING["temperature"],
         repetition_penalty: float = CHAT_SAMPLING["repetition_penalty"], invalid_slices=(),
         english: bool = False, generator=None):
    """The original sat `chat()`: returns (response, history + [(query, response)], image)."""
    params = _params(max_length, top_p, top_k, temperature, repetition_penalty, invalid_slices)
    return ChatEngine(model, tokenizer).chat(image_path, query, history=history, image=image,
                                             english=english, generator=generator, params=params)


def stream_chat(image_path, model, tokenizer, query: str, history: Optional[History] = None, image=None,
                max_length: int = CHAT_SAMPLING["max_length"], top_p: float = CHAT_SAMPLING["top_p"],
                top_k: int = CHAT_SAMPLING["top_k"], temperature: float = CHAT_SAMPLING["temperature"],
                repetition_penalty: float = CHAT_SAMPLING["repetition_penalty"], invalid_slices=(),
                english: bool = False, generator=None):
    """Like chat(), but yields (response so far, history, image) while the answer grows."""
    params = _params(max_length, top_p, top_k, temperature, repetition_penalty, invalid_slices)
    yield from ChatEngine(model, tokenizer).stream_chat(image_path, query, history=history, image=image,
                                                        english=english, generator=generator, params=params)


__all__ = ["ChatEngine", "chat", "stream_chat", "PromptTooLongError", "SamplingParams"]
