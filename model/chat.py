"""The chat engine: prompt building, image handling, generation and post-processing (spec 6).

Every front end (CLI, web, API; sat and HF flavours) goes through `ChatEngine`; `chat()` and
`stream_chat()` keep the original function signatures on top of it.

Prompt (Chinese):  <img></img>问：{q1}\n答：{a1}\n问：{query}\n答：
Prompt (English):  <img></img>Q:{q1}\nA:{a1}\nQ:{query}\nA:
Token ids:         ids("<img>") + [pad] * image_length + ids("</img>问：...") + [gMASK, <sop>]
Without an image the "<img></img>" prefix is left out and the prompt is tokenized in one piece.
The image is encoded once (EVA + Q-Former + projection); `chat()` returns the embeddings as its third
value and a later turn that passes them back as `image=` reuses them.
"""
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .generation import Request, SamplingParams, generate
from .image import load_image, preprocess

History = List[Tuple[str, str]]


class PromptTooLongError(ValueError):
    pass


_CJK = "[\u4e00-\u9fff]"
FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}   # half-width marks turned full-width
PLACEHOLDERS = {"[[训练时间]]": "2023年"}                                  # strings replaced in answers


def process_response(text: str) -> str:
    """Post-processing of the original model: full-width punctuation next to Chinese characters."""
    text = text.strip()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    for half, full in FULL_WIDTH.items():
        text = re.sub(rf"({_CJK}){re.escape(half)}", rf"\1{full}", text)
        text = re.sub(rf"{re.escape(half)}({_CJK})", rf"{full}\1", text)
    return text


def has_chinese(text: str) -> bool:
    return re.search(_CJK, text) is not None


def build_prompt(query: str, history: Optional[History] = None, english: bool = False, image: bool = True) -> str:
    q, a = ("Q:", "A:") if english else ("问：", "答：")
    turns = "".join(f"{q}{old_q}\n{a}{old_a}\n" for old_q, old_a in (history or []))
    return ("<img></img>" if image else "") + turns + f"{q}{query}\n{a}"


def encode_prompt(tokenizer, prompt: str, image_length: int = 0) -> Tuple[List[int], int]:
    """Token ids of a prompt built by build_prompt, and the index of the first image slot (-1: none).
    The text before and after the image slots is tokenized separately, as the original did."""
    if image_length and prompt.startswith("<img></img>"):
        head = tokenizer.encode("<img>", add_special_tokens=False)
        tail = tokenizer.encode(prompt[len("<img>"):], add_special_tokens=False)
        ids = head + [tokenizer.pad_token_id] * image_length + tail
        return tokenizer.build_inputs_with_special_tokens(ids), len(head)
    return tokenizer.encode(prompt, add_special_tokens=True), -1


class ChatEngine:
    def __init__(self, model, tokenizer, *, allow_image_paths: bool = True, allow_image_urls: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.allow_image_paths = allow_image_paths
        self.allow_image_urls = allow_image_urls

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def image_length(self) -> int:
        return self.model.image_length

    # -- images -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, source) -> torch.Tensor:
        """Path / URL / bytes / PIL image / pixel tensor [1,3,H,W] -> embeddings [1, L, hidden].
        Embeddings (a 3-D tensor) pass through unchanged, so a returned image can be reused."""
        if isinstance(source, torch.Tensor):
            if source.dim() == 3:
                return source
            return self.model.encode_image(source.to(self.device))
        img = load_image(source, allow_path=self.allow_image_paths, allow_url=self.allow_image_urls)
        pixels = preprocess(img, self.model.image_size).to(self.device)
        return self.model.encode_image(pixels)

    # -- prompts --------------------------------------------------------------------------------
    def make_request(self, query: str, history: Optional[History], image_embeds, english: bool,
                     params: SamplingParams, generator=None) -> Request:
        prompt = build_prompt(query, history, english=english, image=image_embeds is not None)
        ids, pre_image = encode_prompt(self.tokenizer, prompt, self.image_length if image_embeds is not None else 0)
        if len(ids) >= params.max_length:
            raise PromptTooLongError(
                f"The prompt is {len(ids)} tokens, which leaves no room for an answer within max_length="
                f"{params.max_length}. Shorten the question, clear the history, or raise max_length.")
        return Request(ids=ids, params=params, pre_image=pre_image, generator=generator,
                       image_embeds=None if image_embeds is None else image_embeds[0])

    def decode(self, ids: Sequence[int], final: bool = True) -> str:
        text = self.tokenizer.decode(list(ids))
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character while streaming
        return process_response(text)

    def eos_ids(self) -> List[int]:
        return [self.tokenizer.eos_token_id]

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
        response = ""
        for step in generate(self.model, [request], self.tokenizer.pad_token_id, self.eos_ids()):
            out.append(step[0])
            response = self.decode(out, final=False)
            yield response, history, image_embeds
        response = self.decode(out)
        yield response, history + [(query, response)], image_embeds

    def chat(self, image_path, query: str, history: Optional[History] = None, image=None, **kw):
        final = None
        for final in self.stream_chat(image_path, query, history=history, image=image, **kw):
            pass
        return final


def chat(image_path, model, tokenizer, query: str, history: Optional[History] = None, image=None,
         max_length: int = 1024, top_p: float = 0.7, top_k: int = 30, temperature: float = 0.95,
         repetition_penalty: float = 1.2, invalid_slices=(), english: bool = False, generator=None):
    """The original sat `chat()`: returns (response, history + [(query, response)], image)."""
    params = SamplingParams(max_length=max_length, top_p=top_p, top_k=top_k, temperature=temperature,
                            repetition_penalty=repetition_penalty, invalid_slices=list(invalid_slices))
    return ChatEngine(model, tokenizer).chat(image_path, query, history=history, image=image,
                                             english=english, generator=generator, params=params)


def stream_chat(image_path, model, tokenizer, query: str, history: Optional[History] = None, image=None,
                max_length: int = 1024, top_p: float = 0.7, top_k: int = 30, temperature: float = 0.95,
                repetition_penalty: float = 1.2, invalid_slices=(), english: bool = False, generator=None):
    """Like chat(), but yields (response so far, history, image) while the answer grows."""
    params = SamplingParams(max_length=max_length, top_p=top_p, top_k=top_k, temperature=temperature,
                            repetition_penalty=repetition_penalty, invalid_slices=list(invalid_slices))
    yield from ChatEngine(model, tokenizer).stream_chat(image_path, query, history=history, image=image,
                                                        english=english, generator=generator, params=params)
