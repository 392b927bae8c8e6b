"""Prompt formats and answer post-processing of VisualGLM-6B (spec 6).

Prompt (Chinese):  <img></img>问：{q1}\n答：{a1}\n问：{query}\n答：
Prompt (English):  <img></img>Q:{q1}\nA:{a1}\nQ:{query}\nA:
Token ids:         ids("<img>") + [pad] * image_length + ids("</img>问：...") + [gMASK, <sop>]
Without an image the "<img></img>" prefix is left out and the prompt is tokenized in one piece.
"""
import re
from typing import List, Optional, Tuple

History = List[Tuple[str, str]]


class PromptTooLongError(ValueError):
    pass


_CJK = "[\u4e00-\u9fff]"
FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}   # half-width marks turned full-width
PLACEHOLDERS = {"[[训练时间]]": "2023年"}                                  # strings replaced in answers


# per mark, in FULL_WIDTH's order: the mark, then (pattern, replacement) after and before a Chinese character; compiled
# once: a streaming server runs process_response on the whole answer for every chunk it sends
_MARK_RULES = [(half, re.compile(f"({_CJK}){re.escape(half)}"), f"\\1{full}", re.compile(f"{re.escape(half)}({_CJK})"),
                f"{full}\\1") for half, full in FULL_WIDTH.items()]


def process_response(text: str) -> str:
    """Post-processing of the original model: full-width punctuation next to Chinese characters."""
    return _process(text, start=True, end=True)


def _process(text: str, start: bool, end: bool) -> str:
    """process_response on a part of a text: its whitespace stripped at the text's start / end only."""
    text = text.lstrip() if start else text
    text = text.rstrip() if end else text
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    for half, after_cjk, as_after, before_cjk, as_before in _MARK_RULES:
        if half in text:                      # most answers lack most marks: skip their two passes
            text = before_cjk.sub(as_before, after_cjk.sub(as_after, text))
    return text


class ResponseStream:
    """process_response for one text that grows at its end (an answer being streamed), at a cost per call
    that does not grow with it. Every rule is local (a mark and its neighbour, a placeholder, whitespace
    at the ends), so the text splits at a cut that no rule reaches across: a non-blank character that is
    no half-width mark before it, no half-width mark after it, and no placeholder starting within reach.
    The part before the cut is processed once; each call processes the last LAG to 2 LAG characters."""

    LAG = 64                              # characters kept behind the cut (the end may still change)

    def __init__(self):
        self._source = ""                 # the text up to the cut, as given
        self._done = ""                   # ... processed

    def __call__(self, text: str) -> str:
        """process_response(text), where text begins with the text of the previous calls but for its last
        LAG characters (any other text starts over)."""
        if not text.startswith(self._source):
            self._source = self._done = ""
        cut = len(self._source)
        if len(text) - cut >= 2 * self.LAG:
            new = next((c for c in range(len(text) - self.LAG, len(text) - 2 * self.LAG, -1) if _cuttable(text, c)), 0)
            if new:
                self._done += _process(text[cut:new], start=not cut, end=False)
                self._source, cut = text[:new], new
        return self._done + _process(text[cut:], start=not cut, end=True)


def _cuttable(text: str, c: int) -> bool:
    """Whether process_response(text) = that of text[:c] (not stripped at its end) + that of text[c:]
    (not stripped at its start)."""
    before, after = text[c - 1], text[c]
    return (not before.isspace() and before not in FULL_WIDTH and after not in FULL_WIDTH
            and all(p[0] not in text[max(0, c - len(p) + 1):c] for p in PLACEHOLDERS))


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
