"""Request bodies -> ChatCall: the original `POST /` contract and OpenAI chat completions.

Parsing is strict about types and ranges (a client error is a 400 with a message saying what is
wrong) and lenient about what does not matter: unknown keys are ignored, `null` means "not given".
Text is only ever text: `<img>...</img>` inside a message is passed to the model as characters and
never opened as a path or URL.
"""
import json
import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from model.prompts import has_chinese
from model.defaults import DEMO_SAMPLING
from model.sampling import SamplingParams

from .errors import BadRequestError
from .images import ImageLimits, ImageRef, decode_base64, image_ref_from_url

# The defaults of the original api.py / web_demo.py (spec 6.1); repetition_penalty is chat()'s.
DEFAULTS = DEMO_SAMPLING
DEFAULT_IMAGE_QUERY = "描述这张图片。"
MAX_TEMPERATURE = 10.0
MAX_TOP_K = 1_000_000
MAX_REPETITION_PENALTY = 10.0
MAX_STOP = 4
MAX_PIECE_CHARS = 16        # no ChatGLM token spans more non-space characters than this

History = List[Tuple[str, str]]


@dataclass
class ChatCall:
    query: str
    history: History
    image: Optional[ImageRef]
    english: bool
    params: SamplingParams
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    received_at: Optional[float] = None     # time.monotonic() when the server began reading the request


def loads(body: bytes) -> dict:
    """Parse a JSON object; NaN/Infinity literals, deep nesting and non-objects are client errors."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")
    if not body or not body.strip():
        raise BadRequestError("The request body is empty; send a JSON object.")
    try:
        obj = json.loads(body, parse_constant=no_constants)
    except RecursionError:
        raise BadRequestError("The JSON body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(f"The request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequestError(f"The request body must be a JSON object, not {type(obj).__name__}.")
    return obj


# -- small typed getters -------------------------------------------------------------------------
def _missing(body: dict, key: str) -> bool:
    return body.get(key) is None


def get_number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False,
               lo_open: bool = False):
    if _missing(body, key):
        return default
    v = body[key]
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequestError(f"'{key}' must be {kind}, got {type(v).__name__}.")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise BadRequestError(f"'{key}' must be finite.")
        if integer:
            if not v.is_integer():
                raise BadRequestError(f"'{key}' must be {kind}, got {v}.")
            v = int(v)
    if v < lo or v > hi or (lo_open and v == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise BadRequestError(f"'{key}' must be {low} and <= {hi}, got {v}.")
    return v


def get_bool(body: dict, key: str, default):
    if _missing(body, key):
        return default
    v = body[key]
    if not isinstance(v, bool):
        raise BadRequestError(f"'{key}' must be true or false, got {type(v).__name__}.")
    return v


def check_text(v, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise BadRequestError(f"{what} must be a string, got {type(v).__name__}.")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestError(f"{what} contains invalid Unicode (a lone surrogate).") from None
    if not allow_empty and not v.strip():
        raise BadRequestError(f"{what} must not be empty.")
    return v


def check_length(texts, max_length: int) -> None:
    """Reject text that cannot possibly fit before tokenizing it (tokenizing megabytes takes a while)."""
    total = sum(len(t) for t in texts)
    if total > MAX_PIECE_CHARS * max_length:
        dense = sum(len(re.sub(r"\s+", "", t)) for t in texts)
        if dense > MAX_PIECE_CHARS * max_length:
            raise BadRequestError(f"The prompt is far longer than the model's context of {max_length} tokens.",
                                  type="context_length_exceeded")


def get_history(body: dict, key: str = "history") -> History:
    if _missing(body, key):
        return []
    hist = body[key]
    if not isinstance(hist, list):
        raise BadRequestError(f"'{key}' must be a list of [question, answer] pairs.")
    out = []
    for i, pair in enumerate(hist):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRequestError(f"'{key}[{i}]' must be a [question, answer] pair.")
        out.append((check_text(pair[0], f"'{key}[{i}][0]'", allow_empty=True),
                    check_text(pair[1], f"'{key}[{i}][1]'", allow_empty=True)))
    return out


def sampling(body: dict, max_context: int, *, max_length=None, max_new_tokens=None, max_temperature=MAX_TEMPERATURE,
             defaults=DEFAULTS) -> SamplingParams:
    try:
        return SamplingParams(
            max_length=max_length if max_length is not None else min(defaults["max_length"], max_context),
            max_new_tokens=max_new_tokens,
            temperature=get_number(body, "temperature", defaults["temperature"], 0, max_temperature),
            top_p=get_number(body, "top_p", defaults["top_p"], 0, 1),
            top_k=get_number(body, "top_k", defaults["top_k"], 0, MAX_TOP_K, integer=True),
            repetition_penalty=get_number(body, "repetition_penalty", defaults["repetition_penalty"], 0,
                                          MAX_REPETITION_PENALTY, lo_open=True))
    except ValueError as e:
        raise BadRequestError(str(e)) from None


# -- the original contract: POST / ------------------------------------------------------------------
def parse_original(body: dict, limits: ImageLimits, max_context: int) -> ChatCall:
    """{"text", "image" (base64, optional), "history", "max_length", "top_p", "top_k", "temperature",
    "repetition_penalty", "english" (optional: default follows the text)}."""
    if "text" not in body:
        raise BadRequestError("'text' is required: the question to ask.")
    query = check_text(body["text"], "'text'")
    history = get_history(body)
    image = None
    raw = body.get("image")
    if raw is not None and raw != "":
        if not isinstance(raw, str):
            raise BadRequestError(f"'image' must be a base64 string, got {type(raw).__name__}.")
        head = raw.lstrip()[:16].lower()
        if head.startswith(("data:", "http://", "https://")):
            image = image_ref_from_url(raw, limits)
        else:
            image = ImageRef(data=decode_base64(raw, limits, "image"))
    max_length = get_number(body, "max_length", min(DEFAULTS["max_length"], max_context), 1, max_context,
                            integer=True)
    check_length([query] + [t for pair in history for t in pair], max_length)
    english = get_bool(body, "english", None)
    return ChatCall(query=query, history=history, image=image,
                    english=(not has_chinese(query)) if english is None else english,
                    params=sampling(body, max_context, max_length=max_length))


# -- OpenAI chat completions ---------------------------------------------------------------------------
def _content_parts(content, where: str, limits: ImageLimits, allow_images: bool):
    """-> (text, [image urls as given]) of a message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return check_text(content, f"{where}.content", allow_empty=True), []
    if not isinstance(content, list):
        raise BadRequestError(f"{where}.content must be a string or a list of content parts.")
    texts, images = [], []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise BadRequestError(f"{here} must be an object with a 'type'.")
        kind = part.get("type")
        if kind == "text":
            texts.append(check_text(part.get("text"), f"{here}.text", allow_empty=True))
        elif kind == "image_url":
            if not allow_images:
                raise BadRequestError(f"{here}: images can only be sent in user messages.")
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url.strip():
                raise BadRequestError(f"{here}.image_url.url must be a non-empty string.")
            images.append(url.strip())
        else:
            raise BadRequestError(f"{here}: unsupported content part type {kind!r} (use 'text' or 'image_url').")
    return "\n".join(t for t in texts if t), images


def parse_messages(messages, limits: ImageLimits):
    """OpenAI messages -> (query, history, image url or None, system text)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty list.")
    system, turns, image_urls = [], [], []        # turns: [[user text, assistant text or None]]
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequestError(f"{where} must be an object with 'role' and 'content'.")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise BadRequestError(f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}.")
        if m.get("content") is None:
            raise BadRequestError(f"{where}.content is required.")
        text, urls = _content_parts(m["content"], where, limits, allow_images=(role == "user"))
        if role in ("system", "developer"):
            if turns:
                raise BadRequestError(f"{where}: a system message must come before the conversation.")
            if text.strip():
                system.append(text)
        elif role == "user":
            image_urls += urls
            if turns and turns[-1][1] is None:        # consecutive user messages form one question
                turns[-1][0] = "\n".join(t for t in (turns[-1][0], text) if t)
            else:
                turns.append([text, None])
        else:
            if not turns or turns[-1][1] is not None:
                raise BadRequestError(f"{where}: an assistant message must follow a user message.")
            turns[-1][1] = text
    if not turns or turns[-1][1] is not None:
        raise BadRequestError("The last message must be a user message: the question to answer.")
    distinct = list(dict.fromkeys(image_urls))
    if len(distinct) > 1:
        raise BadRequestError("VisualGLM-6B takes one image per conversation; this request has "
                              f"{len(distinct)} different images.")
    query = turns[-1][0]
    if not query.strip():
        if not distinct:
            raise BadRequestError("The last user message has no text.")
        query = DEFAULT_IMAGE_QUERY
    history = [(q, a) for q, a in turns[:-1]]
    if system:                                     # no system role in VisualGLM's prompt: lead with it
        prefix = "\n".join(system)
        if history:
            history[0] = (f"{prefix}\n{history[0][0]}", history[0][1])
        else:
            query = f"{prefix}\n{query}"
    return query, history, (distinct[0] if distinct else None)


def parse_openai(body: dict, limits: ImageLimits, max_context: int) -> ChatCall:
    query, history, image_url = parse_messages(body.get("messages"), limits)
    image = image_ref_from_url(image_url, limits) if image_url else None
    if get_number(body, "n", 1, 1, 128, integer=True) != 1:
        raise BadRequestError("Only n=1 (one choice per request) is supported.")
    if get_bool(body, "logprobs", False):
        raise BadRequestError("'logprobs' is not supported by this server.")
    if body.get("tools") or body.get("functions"):
        raise BadRequestError("Tools / function calling are not supported by VisualGLM-6B.")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise BadRequestError("Only response_format {'type': 'text'} is supported.")
    for key in ("frequency_penalty", "presence_penalty"):   # accepted for compatibility, not used
        get_number(body, key, 0, -2, 2)
    key = "max_completion_tokens" if not _missing(body, "max_completion_tokens") else "max_tokens"
    max_tokens = get_number(body, key, None, 1, max_context, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise BadRequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty strings.")
    for s in stop:
        check_text(s, "'stop'")
    seed = get_number(body, "seed", None, -(2 ** 63), 2 ** 64 - 1, integer=True)
    stream = get_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequestError("'stream_options' must be an object.")
    include_usage = get_bool(options or {}, "include_usage", False)
    check_length([query] + [t for pair in history for t in pair], max_context)
    english = get_bool(body, "english", None)
    return ChatCall(query=query, history=history, image=image,
                    english=(not has_chinese(query)) if english is None else english,
                    params=sampling(body, max_context, max_length=max_context, max_new_tokens=max_tokens,
                                    max_temperature=2.0),
                    seed=None if seed is None else seed % (2 ** 63), stop=stop, stream=stream,
                    include_usage=include_usage)
