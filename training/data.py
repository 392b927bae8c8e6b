"""The dataset format (spec 8.4) and the datasets built from it.

An entry is {"img", "prompt", "label"} or {"img", "conversations": [...]} in a JSON list or JSON Lines
file; every answer becomes one sample, tokenized up front so that a malformed entry fails before the
model loads. Images are found relative to the dataset file and read when a sample is fetched.
"""
import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from model.image import ImageLoadError, load_image, open_image, pixels_uint8
from model.prompts import build_prompt, encode_prompt

from .console import log

IGNORE = -100   # label of tokens that are not targets (cross-entropy's ignore_index)


class DataError(ValueError):
    """A dataset file or entry is malformed; the message names the file and the entry."""


@dataclass
class Sample:
    input_ids: List[int]
    labels: List[int]
    context_length: int          # index of <sop>
    pre_image: int               # index of the first image placeholder, -1 without an image
    image: Optional[Path]
    where: str                   # "file.json[3]" for error messages


# ----------------------------------------------------------------------------------------------
# reading entries

def read_entries(path: Path):
    """[(where, entry)] from a JSON list or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"Cannot read dataset file {path}: {e}") from e
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from e
        entries = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    else:
        entries = _json_lines(path, text)
    if not entries:
        raise DataError(f"{path} contains no entries.")
    return entries


def _json_lines(path: Path, text: str):
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); a dataset is a JSON list or one "
                            f"JSON object per line.") from e
    return entries


_USER_ROLES = {"user", "human", "question", "q"}
_BOT_ROLES = {"assistant", "gpt", "bot", "model", "answer", "a"}


def entry_turns(entry, where: str):
    """[(prompt, label)] of one entry, in order."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: an entry must be a JSON object, got {type(entry).__name__}.")
    if "img" not in entry:
        raise DataError(f"{where}: missing field 'img' (use \"img\": null for a text-only entry).")
    if "conversations" in entry:
        return _conversation_turns(entry["conversations"], where)
    for key in ("prompt", "label"):
        if key not in entry:
            raise DataError(f"{where}: missing field '{key}' (an entry needs img, prompt and label, "
                            f"or img and conversations).")
        if not isinstance(entry[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(entry[key]).__name__}.")
    return [(entry["prompt"], entry["label"])]


def _conversation_turns(conv, where: str):
    """Turns of a "conversations" list: prompt/label pairs, or role/content messages."""
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list.")
    if all(isinstance(t, dict) and ("prompt" in t or "label" in t) for t in conv):
        turns = []
        for i, t in enumerate(conv):
            for key in ("prompt", "label"):
                if not isinstance(t.get(key), str):
                    raise DataError(f"{where}: conversations[{i}] needs a string field '{key}'.")
            turns.append((t["prompt"], t["label"]))
        return turns
    messages = []
    for i, m in enumerate(conv):
        role = str(m.get("role", m.get("from", ""))).lower() if isinstance(m, dict) else ""
        text = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if role not in _USER_ROLES | _BOT_ROLES or not isinstance(text, str):
            raise DataError(f"{where}: conversations[{i}] must be {{\"prompt\", \"label\"}} or "
                            f"{{\"role\": user|assistant, \"content\": text}}.")
        messages.append((role in _USER_ROLES, text))
    if len(messages) % 2 or any(is_user != (i % 2 == 0) for i, (is_user, _) in enumerate(messages)):
        raise DataError(f"{where}: conversation messages must alternate user, assistant, ... and end "
                        f"with an assistant message.")
    return [(messages[i][1], messages[i + 1][1]) for i in range(0, len(messages), 2)]


def resolve_image(img, dataset_file: Path, where: str) -> Optional[Path]:
    """The image file of an entry: absolute, or relative to the dataset's folder, its parent or the
    working folder (the first that exists); None for "img": null."""
    if img is None:
        return None
    if not isinstance(img, str) or not img.strip():
        raise DataError(f"{where}: 'img' must be a path (or null), got {img!r}.")
    path = Path(img).expanduser()
    candidates = [path] if path.is_absolute() else \
        list(dict.fromkeys([dataset_file.parent / path, dataset_file.parent.parent / path, Path.cwd() / path]))
    for candidate in candidates:
        if candidate.is_file():
            try:
                with open_image(candidate):      # raster formats only, as at inference
                    pass
            except OSError as e:
                raise DataError(f"{where}: image {candidate} is not a readable image ({e}).") from e
            return candidate
    raise DataError(f"{where}: image '{img}' not found (looked at {', '.join(str(c) for c in candidates)}).")


# ----------------------------------------------------------------------------------------------
# tokens

def encode_sample(tokenizer, prompt: str, label: str, has_image: bool, image_length: int,
                  max_source_length: int, max_target_length: int, ignore_pad: bool = True):
    """Token ids and labels of one example (spec 8.4). `prompt` is the full text prompt built by
    model.prompts.build_prompt. Returns (input_ids, labels, context_length, pre_image, truncated)."""
    ids, pre_image = encode_prompt(tokenizer, prompt, image_length if has_image else 0)
    tail = [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert ids[-2:] == tail, "the prompt should end with [gMASK] <sop>"
    a = ids[:-2]
    b = tokenizer.encode(label, add_special_tokens=False)
    truncated = len(a) > max_source_length - 1 or len(b) > max_target_length - 2
    a, b = a[:max_source_length - 1], b[:max_target_length - 2]
    input_ids = tokenizer.build_inputs_with_special_tokens(a, b)   # a [gMASK] <sop> b <eop>
    context_length = len(a) + 1
    labels = [IGNORE] * context_length + input_ids[context_length:]
    if ignore_pad:
        labels = [IGNORE if t == tokenizer.pad_token_id and i >= context_length else t
                  for i, t in enumerate(labels)]
    return input_ids, labels, context_length, pre_image, truncated


def encode_entry(entry, where: str, has_image: bool, *, tokenizer, image_length: int, max_source_length: int,
                 max_target_length: int, ignore_pad: bool = True, source_prefix: str = "", english: bool = False):
    """One sample per answer of a dataset entry, each with the turns before it as history:
    [(input_ids, labels, context_length, pre_image, truncated)]."""
    turns = entry_turns(entry, where)
    lang_english = entry.get("lang") == "en" if isinstance(entry.get("lang"), str) else english
    history, out = [], []
    for prompt, label in turns:
        text = build_prompt(source_prefix + prompt, history, english=lang_english, image=has_image)
        out.append(encode_sample(tokenizer, text, label, has_image, image_length, max_source_length,
                                 max_target_length, ignore_pad))
        history.append((prompt, label))
    return out


# ----------------------------------------------------------------------------------------------
# datasets

class VisualGLMDataset(torch.utils.data.Dataset):
    """Samples of one or more dataset files, tokenized up front (so that every malformed entry is
    reported before training starts); images are read when a sample is fetched."""

    def __init__(self, files: Sequence, tokenizer, image_size, image_length: int, max_source_length: int,
                 max_target_length: int, ignore_pad: bool = True, source_prefix: str = "",
                 english: bool = False, entries=None):
        self.image_size = image_size
        self.samples: List[Sample] = []
        self.truncated = 0
        head = len(tokenizer.encode("<img>", add_special_tokens=False))
        if max_source_length - 1 < head + image_length + 1:
            raise ValueError(f"--max_source_length {max_source_length} leaves no room for the {image_length} "
                             f"image tokens and a question; use at least {head + image_length + 8}.")
        if entries is None:
            entries = [(Path(f), where, e) for f in files for where, e in read_entries(Path(f))]
        encode = functools.partial(encode_entry, tokenizer=tokenizer, image_length=image_length,
                                   max_source_length=max_source_length, max_target_length=max_target_length,
                                   ignore_pad=ignore_pad, source_prefix=source_prefix, english=english)
        for dataset_file, where, entry in entries:
            image = resolve_image(entry.get("img") if isinstance(entry, dict) else None, Path(dataset_file), where)
            for ids, labels, ctx, pre, cut in encode(entry, where, image is not None):
                self.truncated += cut
                self.samples.append(Sample(ids, labels, ctx, pre, image, where))
        self._cache: Dict[Path, torch.Tensor] = {}

    def __len__(self):
        return len(self.samples)

    def image_tensor(self, sample: Sample) -> torch.Tensor:
        if sample.image in self._cache:
            return self._cache[sample.image]
        try:
            pixels = pixels_uint8(load_image(sample.image), self.image_size)  # [3, H, W] uint8
        except ImageLoadError as e:
            raise DataError(f"{sample.where}: {e}") from e
        if len(self._cache) < 256:  # few-shot sets: decode each image once
            self._cache[sample.image] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        return {"input_ids": s.input_ids, "labels": s.labels, "context_length": s.context_length,
                "pre_image": s.pre_image, "image": self.image_tensor(s) if s.image is not None else None}


class GeneratedDataset(torch.utils.data.Dataset):
    """`--train-data synthetic:<samples>[:<seed>]`: synthetic shape scenes and questions made on the fly
    by the loader workers (synthetic/stream.py), each sample a new image. A conversation contributes
    one of its answers (with the turns before it as history), chosen by the sample's index."""

    def __init__(self, spec: str, tokenizer, image_size, image_length: int, max_source_length: int,
                 max_target_length: int, ignore_pad: bool = True, source_prefix: str = "", english: bool = False):
        from synthetic.stream import parse_spec
        try:
            self.size, self.seed = parse_spec(spec)
        except ValueError as e:
            raise DataError(f"--train-data {e}") from None
        self.spec, self.image_size, self.truncated = spec, image_size, 0
        self.encode = functools.partial(encode_entry, tokenizer=tokenizer, image_length=image_length,
                                        max_source_length=max_source_length, max_target_length=max_target_length,
                                        ignore_pad=ignore_pad, source_prefix=source_prefix, english=english)

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        from synthetic.stream import generated_entry
        entry, image = generated_entry(index, self.seed)
        samples = self.encode(entry, f"{self.spec}[{index}]", True)
        ids, labels, ctx, pre, _ = samples[index % len(samples)]
        return {"input_ids": ids, "labels": labels, "context_length": ctx, "pre_image": pre,
                "image": pixels_uint8(image, self.image_size)}


def split_entries(entries: list, weights: str, seed: int):
    """Deterministically split entries into train / valid / test by weights like '9,1,0' (sat's --split)."""
    w = [float(x) for x in str(weights).replace(" ", "").split(",") if x != ""]
    w = (w + [0.0, 0.0, 0.0])[:3]
    if sum(w) <= 0:
        raise ValueError(f"--split {weights!r}: the weights must add up to more than 0")
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    bounds = np.cumsum(w) / sum(w) * len(entries)
    cuts = [int(round(b)) for b in bounds]
    parts = [order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:]]
    return [[entries[i] for i in sorted(p)] for p in parts]


def load_datasets(args, tokenizer, config: dict):
    """(train, valid or None, test or None) datasets; --split divides --train-data when no --valid-data."""
    options = dict(tokenizer=tokenizer, image_size=tuple(config["eva_args"]["image_size"]),
                   image_length=config["image_length"], max_source_length=args.max_source_length,
                   max_target_length=args.max_target_length, ignore_pad=args.ignore_pad_token_for_loss,
                   source_prefix=args.source_prefix, english=args.english)
    # synthetic:<samples>[:<seed>] sources are generated on the fly and only ever train; --split divides files
    from synthetic.stream import SPEC_PREFIX
    generated = [GeneratedDataset(f, **options) for f in args.train_data if f.startswith(SPEC_PREFIX)]
    files = [f for f in args.train_data if not f.startswith(SPEC_PREFIX)]
    entries = [(Path(f), where, e) for f in files for where, e in read_entries(Path(f))]
    if args.valid_data is not None or not entries:
        parts = (entries, [], [])
    else:
        parts = split_entries(entries, args.split, args.seed)
        if not parts[0] and not generated:
            raise DataError(f"--split {args.split} leaves no training entries")
    sets = [VisualGLMDataset(None, entries=part, **options) if part else None for part in parts]
    if sets[0] is not None and sets[0].truncated:
        log(f"warning: {sets[0].truncated} of {len(sets[0])} training samples were cut to "
            f"--max_source_length {args.max_source_length} / --max_target_length {args.max_target_length}")
    if generated:
        sets[0] = torch.utils.data.ConcatDataset(([sets[0]] if sets[0] is not None else []) + generated)
    if args.valid_data:
        sets[1] = VisualGLMDataset(args.valid_data, **options)
    if args.test_data:
        sets[2] = VisualGLMDataset(args.test_data, **options)
    return tuple(sets)
