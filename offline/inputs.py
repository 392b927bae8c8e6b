"""What to answer: a JSON-lines file or a folder of images -> Records.

A JSON line: {"id", "text" (or "prompt"), "image" (optional), "history" (optional), "english" (optional)}.
  image    a path relative to the input file's folder, an absolute path, or an http(s)/file:// URL;
           absent, null or "": a text-only question
  history  earlier turns [[question, answer], ...] (multi-turn)
  english  true/false forces the prompt format; absent: the question's language decides, as in the API
  id       any string or number (written back as a string); absent: "line-N" (N = its line number)
A folder: every image under it (recursively, sorted), id = its path relative to the folder, one question
for all (--prompt). A line that cannot be used becomes a Record with `error` set, which is written to
the output as such: one bad line never stops a run.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from model.prompts import has_chinese

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# the first question about an image when none is given: the API's (Chinese) and the terminal chat's
DEFAULT_PROMPT = {False: "描述这张图片。", True: "Describe the image."}


class InputError(ValueError):
    """The input as a whole cannot be read (no such file or folder)."""


@dataclass
class Record:
    id: str
    query: Optional[str] = None
    image: Optional[str] = None                       # a path or URL; None: text only
    history: List[Tuple[str, str]] = field(default_factory=list)
    english: Optional[bool] = None                    # None: by the language of the question
    error: Optional[str] = None                       # why the line cannot be answered

    def language(self, force_english: bool = False) -> bool:
        """True for the English prompt format: --english, else the line's "english", else the question
        has no Chinese characters (the API's rule)."""
        if force_english:
            return True
        return self.english if self.english is not None else not has_chinese(self.query or "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Record":
        return cls(**json.loads(text))


def read_inputs(path, prompt: Optional[str] = None, english: bool = False) -> Iterator[Record]:
    """Records of a JSON-lines file or of a folder of images, in input order. prompt: the question for
    a folder's images and for lines without "text" (default: DEFAULT_PROMPT in the run's language)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_folder(path, prompt if prompt is not None else DEFAULT_PROMPT[english])
    if path.is_file():
        return read_jsonl(path, prompt)
    raise InputError(f"No such input file or folder: {path}")


def read_folder(folder: Path, prompt: str) -> Iterator[Record]:
    folder = folder.resolve()
    for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        yield Record(id=file.relative_to(folder).as_posix(), query=prompt, image=str(file))


def read_jsonl(path: Path, prompt: Optional[str] = None) -> Iterator[Record]:
    base = path.resolve().parent
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield parse_line(raw, n, base, prompt)


def parse_line(raw: bytes, n: int, base: Path, prompt: Optional[str] = None) -> Record:
    """One input line -> a Record; what is wrong with it goes into Record.error."""
    fallback = f"line-{n}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return Record(id=fallback, error=f"line {n} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return Record(id=fallback, error=f"line {n} must be a JSON object, not {type(obj).__name__}")
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int, float, type(None))):
        return Record(id=fallback, error=f"line {n}: 'id' must be a string or a number")
    record = Record(id=fallback if rid is None else str(rid))
    try:
        record.query = _text(obj, prompt)
        record.image = _image(obj.get("image"), base)
        record.history = _history(obj.get("history"))
        english = obj.get("english")
        if english is not None and not isinstance(english, bool):
            raise ValueError("'english' must be true or false")
        record.english = english
    except ValueError as e:
        record.error = f"line {n}: {e}"
    return record


def _text(obj: dict, prompt: Optional[str]) -> str:
    text = obj.get("text", obj.get("prompt"))
    if text is None:
        if prompt is None:
            raise ValueError("no question: give 'text' (or 'prompt'), or --prompt for every line")
        return prompt
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string")
    return text


def _image(image, base: Path) -> Optional[str]:
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise ValueError("'image' must be a path or URL string")
    if image.startswith(("http://", "https://", "file:")):
        return image
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else base / p)


def _history(history) -> List[Tuple[str, str]]:
    if history is None:
        return []
    ok = isinstance(history, list) and all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history)
    if not ok:
        raise ValueError("'history' must be a list of [question, answer] pairs of strings")
    return [(q, a) for q, a in history]
