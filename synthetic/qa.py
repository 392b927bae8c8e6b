"""Questions and answers about synthetic scenes, in Chinese ("zh") and English ("en").

Every question type has several paraphrased question templates per language; the answer is one
short full sentence in the question's language plus a structured answer used for grading:

    describe    {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"}, ...]}
    colour      {"colour": "red"}
    shape       {"shape": "circle"}
    count       {"count": 2}
    position    {"position": "top-left"}
    exists      {"exists": true}
    background  {"background": "light blue"}      (held out of pretraining: the few-shot task)

Referring to a shape: by its kind alone ("the circle") only when that kind is unique in the
scene; otherwise by colour + kind ("the red circle"), or, for colour questions, where naming the
colour would give the answer away, by kind + position ("the circle in the top-left corner").
Shape questions name the colour ("the red object"), adding the position when two shapes share it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .scenes import CELLS, SHAPE_COLOURS, SHAPE_KINDS, Scene, Shape

QUESTION_TYPES: Tuple[str, ...] = ("describe", "colour", "shape", "count", "position", "exists", "background")
HELD_OUT_TYPES: Tuple[str, ...] = ("background",)
PRETRAIN_TYPES: Tuple[str, ...] = tuple(t for t in QUESTION_TYPES if t not in HELD_OUT_TYPES)
LANGS: Tuple[str, ...] = ("zh", "en")

COLOUR_ZH: Dict[str, str] = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
    "orange": "橙色", "white": "白色", "black": "黑色", "gray": "灰色", "light blue": "浅蓝色",
    "pink": "粉色",
}
SHAPE_ZH: Dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
POSITION_ZH: Dict[str, str] = {
    "top-left": "左上角", "top": "上方", "top-right": "右上角",
    "left": "左侧", "centre": "中间", "right": "右侧",
    "bottom-left": "左下角", "bottom": "下方", "bottom-right": "右下角",
}
POSITION_EN: Dict[str, str] = {
    "top-left": "in the top-left corner", "top": "at the top", "top-right": "in the top-right corner",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom-left": "in the bottom-left corner", "bottom": "at the bottom",
    "bottom-right": "in the bottom-right corner",
}
NUMBER_EN: Dict[int, str] = {1: "one", 2: "two", 3: "three"}
NUMBER_ZH: Dict[int, str] = {1: "一", 2: "两", 3: "三"}

# Question templates. Fields: {ref} (a referring expression), {a_obj} / {obj} (exists questions).
TEMPLATES: Dict[str, Dict[str, List[str]]] = {
    "describe": {
        "en": ["Describe the image.", "Describe this picture.", "What is in this image?",
               "What do you see in the picture?", "Briefly describe what this image shows."],
        "zh": ["描述这张图片。", "请描述一下这张图片。", "这张图片里有什么？", "图中有哪些东西？",
               "简单描述一下图片的内容。"],
    },
    "colour": {
        "en": ["What colour is {ref}?", "What color is {ref}?", "What is the colour of {ref}?",
               "Which colour does {ref} have?", "Tell me the color of {ref}."],
        "zh": ["{ref}是什么颜色的？", "图中的{ref}是什么颜色？", "{ref}的颜色是什么？", "请告诉我{ref}的颜色。"],
    },
    "shape": {
        "en": ["What shape is {ref}?", "What is the shape of {ref}?", "What kind of shape is {ref}?",
               "Tell me the shape of {ref}."],
        "zh": ["{ref}是什么形状？", "{ref}是什么形状的？", "请说出{ref}是什么形状。", "请问{ref}是什么形状？"],
    },
    "count": {
        "en": ["How many shapes are there in the image?", "How many shapes are in this picture?",
               "How many objects can you see?", "Count the shapes in the image.",
               "What is the number of shapes in the picture?"],
        "zh": ["图中有几个图形？", "这张图片里有多少个图形？", "数一数图中有几个形状。", "图片中一共有几个物体？"],
    },
    "position": {
        "en": ["Where is {ref}?", "Where is {ref} located in the image?",
               "In which part of the picture is {ref}?", "Where can I find {ref} in the image?"],
        "zh": ["{ref}在哪里？", "{ref}在图片的什么位置？", "{ref}位于图中的哪个位置？", "图中的{ref}在哪儿？"],
    },
    "exists": {
        "en": ["Is there {a_obj} in the image?", "Is there {a_obj} in this picture?",
               "Does the image contain {a_obj}?", "Can you see {a_obj}?", "Is there any {obj}?"],
        "zh": ["图中有{obj}吗？", "这张图片里有没有{obj}？", "图片中是否有{obj}？", "图里能看到{obj}吗？"],
    },
    "background": {
        "en": ["What colour is the background?", "What color is the background of this image?",
               "What is the background colour of the picture?", "Which colour is the background?"],
        "zh": ["这张图片的背景是什么颜色？", "图片的背景是什么颜色的？", "背景是什么颜色？", "这张图的背景颜色是什么？"],
    },
}


@dataclass(frozen=True)
class QA:
    type: str
    lang: str
    prompt: str
    label: str
    answer: dict
    template: int = 0     # index of the paraphrase in TEMPLATES[type][lang]

    def to_turn(self) -> dict:
        """The JSON form of one conversation turn."""
        return {"prompt": self.prompt, "label": self.label, "type": self.type, "answer": dict(self.answer)}


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def colour_name(colour: str, lang: str) -> str:
    return COLOUR_ZH[colour] if lang == "zh" else colour


def shape_name(kind: str, lang: str) -> str:
    return SHAPE_ZH[kind] if lang == "zh" else kind


def position_phrase(cell: str, lang: str) -> str:
    """'in the top-left corner' / '左上角'."""
    return POSITION_ZH[cell] if lang == "zh" else POSITION_EN[cell]


def coloured_shape(colour: str, kind: str, lang: str) -> str:
    """'red circle' / '红色的圆形' (no article)."""
    if lang == "zh":
        return f"{COLOUR_ZH[colour]}的{SHAPE_ZH[kind]}"
    return f"{colour} {kind}"


def count_phrase(n: int, lang: str) -> str:
    if lang == "zh":
        return f"图中有{NUMBER_ZH[n]}个图形"
    if n == 1:
        return "There is one shape"
    return f"There are {NUMBER_EN[n]} shapes"


# ----------------------------------------------------------------------------- referring expressions

def _ref_by_kind(scene: Scene, shape: Shape, lang: str, fallback: str) -> str:
    """'the circle' when unique, else the fallback: 'colour' (red circle) or 'position'."""
    if scene.kind_count(shape.kind) == 1:
        return SHAPE_ZH[shape.kind] if lang == "zh" else f"the {shape.kind}"
    if fallback == "colour":
        return coloured_shape(shape.colour, shape.kind, "zh") if lang == "zh" else f"the {shape.colour} {shape.kind}"
    if lang == "zh":
        return f"{POSITION_ZH[shape.cell]}的{SHAPE_ZH[shape.kind]}"
    return f"the {shape.kind} {POSITION_EN[shape.cell]}"


def _ref_by_colour(scene: Scene, shape: Shape, lang: str) -> str:
    """'the red object' / '红色的图形', with the position when that colour is not unique."""
    unique = scene.colour_count(shape.colour) == 1
    if lang == "zh":
        if unique:
            return f"{COLOUR_ZH[shape.colour]}的图形"
        return f"{POSITION_ZH[shape.cell]}的{COLOUR_ZH[shape.colour]}图形"
    if unique:
        return f"the {shape.colour} object"
    return f"the {shape.colour} object {POSITION_EN[shape.cell]}"


# ----------------------------------------------------------------------------- one question

def _pick_template(qtype: str, lang: str, rng: random.Random) -> Tuple[int, str]:
    options = TEMPLATES[qtype][lang]
    index = rng.randrange(len(options))
    return index, options[index]


def _scene_opening(scene: Scene, lang: str) -> str:
    """'There are two shapes on a pink background' / '在粉色背景上，图中有两个图形': how a description
    starts, and the whole answer to the background question. Describing is how the model learns to see
    the background at all; answering the held-out question in the same words lets a few-shot fine-tune
    teach it when to say this (and stop) without inventing a new way to say it."""
    n = len(scene.shapes)
    if lang == "zh":
        return f"在{COLOUR_ZH[scene.background]}背景上，{count_phrase(n, 'zh')}"
    return f"{count_phrase(n, 'en')} on {_article(scene.background)} {scene.background} background"


def _describe_answer(scene: Scene, lang: str) -> str:
    """The opening (count and background), then every shape with its colour and place."""
    shapes = scene.ordered_shapes
    if lang == "zh":
        parts = [f"{POSITION_ZH[s.cell]}有一个{coloured_shape(s.colour, s.kind, 'zh')}" for s in shapes]
        return f"{_scene_opening(scene, 'zh')}：" + "，".join(parts) + "。"
    parts = []
    for s in shapes:
        obj = coloured_shape(s.colour, s.kind, "en")
        parts.append(f"{_article(obj)} {obj} {POSITION_EN[s.cell]}")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{_scene_opening(scene, 'en')}: {listed}."


def _absent_pair(scene: Scene, rng: random.Random) -> Tuple[str, str]:
    """A (colour, kind) not in the scene; usually a near miss of a shape that is there."""
    colours = [c for c in SHAPE_COLOURS if c != scene.background]
    if rng.random() < 0.7:
        shape = rng.choice(scene.ordered_shapes)
        if rng.random() < 0.5:
            candidates = [(c, shape.kind) for c in colours if not scene.has(c, shape.kind)]
        else:
            candidates = [(shape.colour, k) for k in SHAPE_KINDS if not scene.has(shape.colour, k)]
        if candidates:
            return rng.choice(candidates)
    candidates = [(c, k) for c in colours for k in SHAPE_KINDS if not scene.has(c, k)]
    return rng.choice(candidates)


def make_qa(scene: Scene, qtype: str, lang: str, rng: random.Random) -> QA:
    """One question of type `qtype` in language `lang` about `scene`, with its answer."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}")
    zh = lang == "zh"
    index, template = _pick_template(qtype, lang, rng)

    if qtype == "describe":
        prompt = template
        label = _describe_answer(scene, lang)
        answer = {"shapes": [{"colour": s.colour, "kind": s.kind, "position": s.cell}
                             for s in scene.ordered_shapes]}
    elif qtype == "colour":
        shape = rng.choice(scene.ordered_shapes)
        ref = _ref_by_kind(scene, shape, lang, fallback="position")
        prompt = template.format(ref=ref)
        label = f"{ref}是{COLOUR_ZH[shape.colour]}的。" if zh else f"{_capitalise(ref)} is {shape.colour}."
        answer = {"colour": shape.colour}
    elif qtype == "shape":
        shape = rng.choice(scene.ordered_shapes)
        ref = _ref_by_colour(scene, shape, lang)
        prompt = template.format(ref=ref)
        label = (f"{ref}是{SHAPE_ZH[shape.kind]}。" if zh
                 else f"{_capitalise(ref)} is {_article(shape.kind)} {shape.kind}.")
        answer = {"shape": shape.kind}
    elif qtype == "count":
        n = len(scene.shapes)
        prompt = template
        label = count_phrase(n, lang) + "。" if zh else count_phrase(n, lang) + "."
        answer = {"count": n}
    elif qtype == "position":
        shape = rng.choice(scene.ordered_shapes)
        ref = _ref_by_kind(scene, shape, lang, fallback="colour")
        prompt = template.format(ref=ref)
        label = (f"{ref}在{POSITION_ZH[shape.cell]}。" if zh
                 else f"{_capitalise(ref)} is {POSITION_EN[shape.cell]}.")
        answer = {"position": shape.cell}
    elif qtype == "exists":
        if rng.random() < 0.5:
            s = rng.choice(scene.ordered_shapes)
            colour, kind, present = s.colour, s.kind, True
        else:
            (colour, kind), present = _absent_pair(scene, rng), False
        obj = coloured_shape(colour, kind, lang)
        a_obj = obj if zh else f"{_article(obj)} {obj}"
        prompt = template.format(obj=obj, a_obj=a_obj)
        if zh:
            label = f"是的，图中有{obj}。" if present else f"没有，图中没有{obj}。"
        else:
            label = f"Yes, there is {a_obj}." if present else f"No, there is no {obj}."
        answer = {"exists": present}
    else:  # background
        prompt = template
        label = _scene_opening(scene, lang) + ("。" if zh else ".")
        answer = {"background": scene.background}
    return QA(type=qtype, lang=lang, prompt=prompt, label=label, answer=answer, template=index)


def sample_qa(scene: Scene, rng: random.Random, lang: Optional[str] = None,
              types: Sequence[str] = PRETRAIN_TYPES) -> QA:
    """A random question (type drawn uniformly from `types`; language 50/50 unless given)."""
    qtype = rng.choice(list(types))
    if lang is None:
        lang = rng.choice(LANGS)
    return make_qa(scene, qtype, lang, rng)


def make_conversation(scene: Scene, rng: random.Random, lang: Optional[str] = None,
                      n_turns: Optional[int] = None, types: Sequence[str] = PRETRAIN_TYPES) -> List[QA]:
    """2 or 3 turns (distinct question types) about one scene, all in one language."""
    if lang is None:
        lang = rng.choice(LANGS)
    types = list(types)
    if n_turns is None:
        n_turns = rng.randint(2, 3)
    n_turns = min(n_turns, len(types))
    return [make_qa(scene, t, lang, rng) for t in rng.sample(types, n_turns)]
