"""Writing and reading dataset splits in the VisualGLM fine-tune format.

A split is a folder `<name>/` holding PNG images `<name>/000000.png`, ... and `<name>/dataset.json`,
a JSON list (UTF-8, not ASCII-escaped) of items:

    single turn: {"img": "<name>/000000.png", "prompt": "...", "label": "...",
                  "type": "colour", "lang": "en", "answer": {"colour": "red"}}
    multi turn:  {"img": "<name>/000001.png",
                  "conversations": [{"prompt": "...", "label": "...", "type": "count", "answer": {"count": 2}},
                                    ...],
                  "type": "multi_turn", "lang": "zh", "answer": [{"count": 2}, ...]}

As in the original fewshot-data (`"img": "fewshot-data/2p.png"`), `img` is relative to the folder
that holds the split folder (run training from there), see `resolve_image_path`. Prompts are raw
questions: the `问：...\\n答：` / `Q:...\\nA:` template is applied by the chat engine / trainer.
The same (split folder name, n_images, seed, options) gives byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from .qa import LANGS, NEW_TYPES, PRETRAIN_TYPES, QUESTION_TYPES, QA, WORDINGS, make_conversation, sample_qa
from .scenes import save_png, sample_scene

TRAIN_SEED = 1
EVAL_SEED = 2
FEWSHOT_SEED = 20230517

DEFAULT_MULTI_TURN_FRACTION = 0.2


def _resolve_types(types: Optional[Sequence[str]], include_background: bool,
                   wording: str = "templates") -> List[str]:
    """The types asked by default: those of the first training, plus the absent-shape questions in
    the wordings that have them (see synthetic.qa.WORDINGS)."""
    if wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; known: {WORDINGS}")
    if types is None:
        types = list(PRETRAIN_TYPES) + (list(NEW_TYPES) if wording != "templates" else [])
        types += ["background"] if include_background else []
    types = list(types)
    for t in types:
        if t not in QUESTION_TYPES:
            raise ValueError(f"unknown question type {t!r}; known: {QUESTION_TYPES}")
    if "background" in types and not include_background:
        raise ValueError("the background question is held out: pass include_background=True to ask it")
    if not types:
        raise ValueError("no question types")
    return types


def _single_item(img: str, qa: QA) -> dict:
    return {"img": img, "prompt": qa.prompt, "label": qa.label, "type": qa.type, "lang": qa.lang,
            "answer": dict(qa.answer)}


def _multi_item(img: str, turns: List[QA]) -> dict:
    return {"img": img, "conversations": [t.to_turn() for t in turns], "type": "multi_turn",
            "lang": turns[0].lang, "answer": [dict(t.answer) for t in turns]}


def generate_items(n_images: int, seed: int, include_background: bool = False,
                   multi_turn_fraction: float = DEFAULT_MULTI_TURN_FRACTION,
                   types: Optional[Sequence[str]] = None, questions_per_image: int = 1,
                   lang: Optional[str] = None, img_prefix: str = "", render: bool = True,
                   wording: str = "templates"):
    """Yield (scene, image or None, items) for each image, deterministically from `seed`.

    Each image gets `questions_per_image` items; each item is a multi-turn conversation with
    probability `multi_turn_fraction` (when at least two types are allowed), else one question.
    `lang` pins the language (default: 50/50 per item)."""
    types = _resolve_types(types, include_background, wording)
    if lang is not None and lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}")
    rng = random.Random(seed)
    for index in range(n_images):
        scene = sample_scene(rng)
        items = scene_items(scene, rng, f"{img_prefix}{index:06d}.png", types, multi_turn_fraction,
                            questions_per_image, lang, wording)
        yield scene, (scene.render() if render else None), items


def scene_items(scene, rng: random.Random, img, types: Sequence[str], multi_turn_fraction: float,
                questions_per_image: int = 1, lang: Optional[str] = None,
                wording: str = "templates") -> List[dict]:
    """`questions_per_image` items about one scene (see generate_items), drawn from `rng`."""
    items = []
    for _ in range(questions_per_image):
        if len(types) >= 2 and rng.random() < multi_turn_fraction:
            items.append(_multi_item(img, make_conversation(scene, rng, lang=lang, types=types, wording=wording)))
        else:
            items.append(_single_item(img, sample_qa(scene, rng, lang=lang, types=types, wording=wording)))
    return items


def write_dataset_json(items: List[dict], path: Union[str, Path]) -> None:
    text = json.dumps(items, ensure_ascii=False, indent=1) + "\n"
    Path(path).write_bytes(text.encode("utf-8"))


def generate_split(out_dir: Union[str, Path], n_images: int, seed: int, include_background: bool = False,
                   multi_turn_fraction: float = DEFAULT_MULTI_TURN_FRACTION,
                   types: Optional[Sequence[str]] = None, questions_per_image: int = 1,
                   lang: Optional[str] = None, on_image: Optional[Callable[[], None]] = None,
                   wording: str = "templates") -> List[dict]:
    """Write `n_images` PNGs and `dataset.json` into `out_dir`; return the items written.

    `img` paths are `<basename of out_dir>/<index>.png` (relative to out_dir's parent). `on_image` is
    called after each image is written (evaluate.py moves its progress bar with it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir.resolve().name + "/"
    all_items: List[dict] = []
    for index, (scene, image, items) in enumerate(generate_items(
            n_images, seed, include_background=include_background, multi_turn_fraction=multi_turn_fraction,
            types=types, questions_per_image=questions_per_image, lang=lang, img_prefix=prefix, wording=wording)):
        save_png(image, out_dir / f"{index:06d}.png")
        all_items.extend(items)
        if on_image is not None:
            on_image()
    write_dataset_json(all_items, out_dir / "dataset.json")
    return all_items


def resolve_image_path(img: str, dataset_json: Union[str, Path, None] = None) -> str:
    """Find the file an item's `img` names: as given (relative to the working directory), else
    relative to the folder holding the split folder, else relative to the split folder itself."""
    if os.path.isabs(img) or dataset_json is None:
        return img
    split_dir = Path(dataset_json).resolve().parent
    for base in (None, split_dir.parent, split_dir):
        candidate = Path(img) if base is None else base / img
        if candidate.is_file():
            return str(candidate if base is not None else candidate.resolve())
    return str(split_dir.parent / img)


def load_split(path: Union[str, Path]) -> List[dict]:
    """Read a split (a folder with dataset.json, or the json file); `img` becomes an absolute path."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    items = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for item in items:
        item = dict(item)
        item["img"] = str(Path(resolve_image_path(item["img"], path)).resolve())
        out.append(item)
    return out


def build_corpus(n_images: int = 2000, seed: int = TRAIN_SEED, include_background: bool = True,
                 questions_per_image: int = 3) -> List[str]:
    """Text corpus for training a tokenizer: every question and answer of a generated mix (images
    are not rendered), plus every template and vocabulary word in both languages. The background
    task is included by default so the few-shot answers' words are in the vocabulary."""
    from .qa import COLOUR_ZH, NUMBER_EN, NUMBER_ZH, POSITION_EN, POSITION_ZH, SHAPE_ZH, TEMPLATES
    texts: List[str] = []
    for _, _, items in generate_items(n_images, seed, include_background=include_background,
                                      multi_turn_fraction=DEFAULT_MULTI_TURN_FRACTION,
                                      questions_per_image=questions_per_image, render=False):
        for item in items:
            for turn in item.get("conversations", [item]):
                texts.append(turn["prompt"])
                texts.append(turn["label"])
    for qtype, by_lang in TEMPLATES.items():
        if qtype == "background" and not include_background:
            continue
        for templates in by_lang.values():
            texts.extend(templates)
    for table in (COLOUR_ZH, SHAPE_ZH, POSITION_ZH):
        for en, zh in table.items():
            texts.append(f"{en} {zh}")
    texts.extend(POSITION_EN.values())
    texts.extend(f"{n} {NUMBER_EN[n]} {NUMBER_ZH[n]}" for n in NUMBER_EN)
    return texts
