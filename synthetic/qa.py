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
    absent      {"absent": "circle"}     a colour or position question about a kind that is not there
                                         ("Where is the circle?"), answered "There is no circle ...";
                {"absent": "circle", "colour": "red"}   half the position questions: about a coloured
                                         shape that is not there ("Where is the red circle?" while a
                                         blue one may be), answered "There is no red circle ..."

Four wordings (WORDINGS) say which question templates are drawn:
    templates    TEMPLATES, the questions the shipped model was first trained on (the default: the
                 same seed gives the same items as before the other wordings existed)
    trained      TEMPLATES + MORE_TEMPLATES + the expansions of synthetic/phrasing.py's patterns, less
                 any held-out question: many natural phrasings, yes/no questions that name no colour
                 ("Is there a star?", answered with the colours of the stars that are there) and
                 absent-shape questions; what recipes/continue_visualglm_tiny.sh trains on. Drawn as
                 40% TEMPLATES (so they stay answered), 15% MORE_TEMPLATES, 45% patterns (a pattern
                 first, then one of its questions), and one prompt in ten typed casually (no final
                 punctuation; English starting in lower case)
    rewordings   REWORDINGS, a fixed held-out list that is never trained on (tests check that no
                 rewording is a training question): how well the model copes with new phrasings
    rewordings2  REWORDINGS_2, a second held-out list, written before the phrasing patterns (the first
                 list had been looked at while writing them, so it is no longer a blind test)

Referring to a shape: by its kind alone ("the circle") only when that kind is unique in the
scene; otherwise by colour + kind ("the red circle"), or, for colour questions, where naming the
colour would give the answer away, by kind + position ("the circle in the top-left corner").
Shape questions name the colour ("the red object"), adding the position when two shapes share it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

from .phrasing import variant_groups
from .scenes import CELLS, SHAPE_COLOURS, SHAPE_KINDS, Scene, Shape

QUESTION_TYPES: Tuple[str, ...] = ("describe", "colour", "shape", "count", "position", "exists", "background",
                                   "absent")
HELD_OUT_TYPES: Tuple[str, ...] = ("background",)
# The types of the first training (the default everywhere), and those added when continuing it.
PRETRAIN_TYPES: Tuple[str, ...] = ("describe", "colour", "shape", "count", "position", "exists")
NEW_TYPES: Tuple[str, ...] = ("absent",)
LANGS: Tuple[str, ...] = ("zh", "en")
WORDINGS: Tuple[str, ...] = ("templates", "trained", "rewordings", "rewordings2")
HELD_OUT_WORDINGS: Tuple[str, ...] = ("rewordings", "rewordings2")

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

# More paraphrases for the `trained` wording. Fields as above, plus {kind} / {a_kind} / {kinds}: the
# exists questions that name no colour ("Is there a star?"). Chinese wording keeps to characters that
# the bundled tokenizer has pieces for (no byte fallback; a test checks): e.g. no 不, 和, 种 or 呢, and
# English without apostrophes or the letters x and z.
MORE_TEMPLATES: Dict[str, Dict[str, List[str]]] = {
    "describe": {
        "en": ["What does this image show?", "Describe what you see.", "Tell me about this picture.",
               "What can you see in this image?", "Describe the picture for me, please.", "Tell me what this image shows."],
        "zh": ["这张图片里有些什么？", "请描述图中的内容。", "说一说这张图片。", "图片上有什么东西？", "这张图上有些什么？"],
    },
    "colour": {
        "en": ["Which color is {ref}?", "What colour does {ref} have?", "Tell me what colour {ref} is.",
               "Can you tell me the colour of {ref}?", "Do you know the colour of {ref}?", "Tell me what color {ref} is, please."],
        "zh": ["{ref}是哪个颜色？", "这张图片里{ref}是什么颜色的？", "请说出{ref}的颜色。", "告诉我{ref}是什么颜色。",
               "请说一下{ref}是什么颜色。"],
    },
    "shape": {
        "en": ["Which shape is {ref}?", "What shape does {ref} have?", "Can you tell me the shape of {ref}?",
               "What kind of shape is {ref} in this picture?", "Would you tell me the shape of {ref}?",
               "Tell me what shape {ref} has, please."],
        "zh": ["{ref}是哪个形状？", "这张图片里{ref}是什么形状？", "告诉我{ref}的形状。", "{ref}的形状是什么？",
               "这张图上的{ref}是什么形状？"],
    },
    "count": {
        "en": ["How many objects are there?", "How many shapes do you see?", "How many shapes are there?",
               "Count the objects in this picture.", "What is the number of objects in the image?",
               "How many things can you see?", "Count the objects for me, please."],
        "zh": ["这张图片里有几个图形？", "图片里有多少个物体？", "图中一共有多少个形状？", "请数一数这张图片里有几个东西。",
               "图上有几个形状？", "请说一下这张图上有几个图形。"],
    },
    "position": {
        "en": ["Where is {ref} in the picture?", "Which part of the image is {ref} in?", "Where do you see {ref}?",
               "Tell me where {ref} is.", "Where would you say {ref} is?", "Can you give me the position of {ref}?"],
        "zh": ["{ref}在图中的什么位置？", "这张图片里{ref}在哪里？", "请告诉我{ref}在哪儿。", "{ref}位于哪里？",
               "这张图上的{ref}在哪里？"],
    },
    "exists": {
        "en": ["Is there {a_kind}?", "Is there {a_kind} in the picture?", "Can you see {a_kind}?",
               "Does the image contain {a_kind}?", "Is there any {kind} in this image?", "Are there any {kinds}?",
               "Would I see {a_kind} in this picture?", "Do you know if there is {a_kind}?",
               "Is there {a_obj}?", "Do you see {a_obj}?"],
        "zh": ["图里有{kind}吗？", "这张图片里有{kind}吗？", "图中有没有{kind}？", "图片里能看到{kind}吗？",
               "图中是否有{kind}？", "这张图上有{kind}吗？", "图片里有没有{obj}？", "这张图里有{obj}吗？"],
    },
}

# Held out: never trained on (a test checks that none of these is a training template). The absent
# type draws from the colour and position lists, as it does in the other wordings.
REWORDINGS: Dict[str, Dict[str, List[str]]] = {
    "describe": {
        "en": ["What is shown in the picture?", "Can you describe this image for me?",
               "Can you give me a description of the picture?", "What do you see here?"],
        "zh": ["图里有什么？", "请简单描述一下这张图。", "能描述一下图片的内容吗？", "告诉我这张图片里有哪些东西。"],
    },
    "colour": {
        "en": ["What colour would you say {ref} is?", "Do you know what color {ref} is?",
               "I want to know the colour of {ref}.", "What color is {ref} in this image?"],
        "zh": ["图片中{ref}的颜色是什么？", "请问{ref}是什么颜色的？", "能说一下{ref}的颜色吗？", "图里的{ref}是哪个颜色？"],
    },
    "shape": {
        "en": ["What shape would you say {ref} is?", "What sort of shape is {ref}?", "Describe the shape of {ref}.",
               "Do you know what shape {ref} is?"],
        "zh": ["请问图中{ref}是什么形状的？", "能说一下{ref}的形状吗？", "{ref}是个什么形状？", "图片里的{ref}是哪个形状的？"],
    },
    "count": {
        "en": ["How many things are in the picture?", "Can you count the shapes for me?",
               "How many shapes can you find in this image?", "Tell me how many objects there are."],
        "zh": ["这张图里一共有几个形状？", "图片上有多少个东西？", "能告诉我图中有几个物体吗？", "请问图片里一共有多少个图形？"],
    },
    "position": {
        "en": ["Where would I find {ref}?", "Can you tell me where {ref} is located?",
               "In what part of the image can I find {ref}?", "What is the position of {ref}?"],
        "zh": ["图片里的{ref}在什么位置？", "请问{ref}在哪个位置？", "能告诉我{ref}在哪里吗？", "{ref}在这张图的哪个位置？"],
    },
    "exists": {
        "en": ["Do you see {a_kind} anywhere?", "Are there any {kinds} in the picture?",
               "Can I find {a_kind} in this image?", "Is {a_obj} visible in the picture?",
               "Is there {a_obj} anywhere in the image?"],
        "zh": ["图片上有{kind}吗？", "请问图中有{kind}吗？", "这张图里能看到{kind}吗？", "能看到{obj}吗？",
               "请问图片里有没有{obj}？"],
    },
}

# The second held-out list (wording rewordings2), written before synthetic/phrasing.py's patterns.
REWORDINGS_2: Dict[str, Dict[str, List[str]]] = {
    "describe": {
        "en": ["What is going on in this picture?", "Please give a short description of the image.",
               "What objects are in the image?", "Could you describe the picture?"],
        "zh": ["这幅图里画了什么？", "请说说图片里有什么。", "图上都有什么？", "描述一下图里的内容。"],
    },
    "colour": {
        "en": ["Could you tell me which colour {ref} is?", "Tell me, what colour is {ref}?",
               "What colour is {ref} here?", "Please name the colour of {ref}."],
        "zh": ["你知道{ref}是什么颜色吗？", "{ref}是啥颜色？", "请问图里的{ref}是什么颜色？", "{ref}的颜色是哪个？"],
    },
    "shape": {
        "en": ["Could you tell me the shape of {ref}?", "Which shape does {ref} have, please?",
               "What is {ref} shaped like?", "Tell me, what shape is {ref}?"],
        "zh": ["你知道{ref}是什么形状吗？", "{ref}是一个什么形状？", "请告诉我{ref}的形状是什么。", "{ref}是啥形状？"],
    },
    "count": {
        "en": ["How many shapes are shown?", "Could you count the objects in the image?",
               "What number of shapes do you see?", "How many figures are in the picture?"],
        "zh": ["图里有几个东西？", "你能数出图中有几个图形吗？", "这张图上一共有多少个形状？", "图片里总共有几个图形？"],
    },
    "position": {
        "en": ["Could you tell me where {ref} is?", "Where exactly is {ref}?",
               "Which part of the picture is {ref} in?", "Where is {ref} placed in the image?"],
        "zh": ["你知道{ref}在哪里吗？", "{ref}在图上的哪个位置？", "请说一下{ref}的位置。", "{ref}在哪个地方？"],
    },
    "exists": {
        "en": ["Is there {a_kind} in the image at all?", "Could you see {a_kind} in the picture?",
               "Does this picture have {a_obj}?", "Do I see {a_obj} in this image?", "Can you find {a_obj}?"],
        "zh": ["图中能找到{kind}吗？", "这幅图里有{kind}吗？", "你看到{obj}了吗？", "图上有没有{obj}？",
               "图里有没有{kind}？"],
    },
}
HELD_OUT: Dict[str, Dict[str, Dict[str, List[str]]]] = {"rewordings": REWORDINGS, "rewordings2": REWORDINGS_2}

# How a Chinese question may name a kind (answers always use SHAPE_ZH): people say 星星 and 圆 too.
KIND_ZH_ALIASES: Dict[str, List[str]] = {"circle": ["圆形", "圆"], "square": ["正方形", "方形"],
                                         "triangle": ["三角形"], "star": ["星形", "星星"]}


def surface(template: str) -> str:
    """A question as a reader sees it: case, punctuation, spaces and color/colour do not make it new."""
    text = template.lower().replace("color", "colour")
    return re.sub(r"[\s?？。.!！,，]", "", text)


@lru_cache(maxsize=None)
def _held_out_surfaces() -> frozenset:
    return frozenset(surface(t) for table in HELD_OUT.values() for by_lang in table.values()
                     for ts in by_lang.values() for t in ts)


# How the trained wording draws: its groups' shares (the patterns share theirs equally).
TRAINED_SHARES = {"templates": 0.40, "more": 0.15, "patterns": 0.45}


@lru_cache(maxsize=None)
def _trained_groups(qtype: str, lang: str) -> Tuple[Tuple[float, Tuple[str, ...]], ...]:
    """(share, questions) groups of the trained wording: TEMPLATES, MORE_TEMPLATES, one per phrasing
    pattern; every held-out question and every repeat of an earlier one left out."""
    patterns = variant_groups(qtype, lang)
    groups = [(TRAINED_SHARES["templates"], TEMPLATES[qtype][lang]),
              (TRAINED_SHARES["more"], MORE_TEMPLATES.get(qtype, {}).get(lang, []))]
    groups += [(TRAINED_SHARES["patterns"] / len(patterns), g) for g in patterns]
    held, seen, out = _held_out_surfaces(), set(), []
    for share, questions in groups:
        kept = tuple(t for t in questions if surface(t) not in held and t not in seen)
        seen.update(kept)
        if kept:
            out.append((share, kept))
    total = sum(share for share, _ in out)
    return tuple((share / total, kept) for share, kept in out)


def _groups(qtype: str, lang: str, wording: str) -> List[Tuple[float, Tuple[str, ...]]]:
    if wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; known: {WORDINGS}")
    if qtype == "absent":
        colour, position = _groups("colour", lang, wording), _groups("position", lang, wording)
        return [(share / 2, g) for share, g in colour + position]
    if wording == "trained":
        return list(_trained_groups(qtype, lang))
    if wording in HELD_OUT and qtype in HELD_OUT[wording]:
        return [(1.0, tuple(HELD_OUT[wording][qtype][lang]))]
    return [(1.0, tuple(TEMPLATES[qtype][lang]))]


def templates_for(qtype: str, lang: str, wording: str = "templates") -> List[str]:
    """The question templates of one type and language in a wording (see the module docstring). The
    absent type asks colour and position questions; the background question has only TEMPLATES."""
    return [t for _, group in _groups(qtype, lang, wording) for t in group]


@dataclass(frozen=True)
class QA:
    type: str
    lang: str
    prompt: str
    label: str
    answer: dict
    template: int = 0     # index of the paraphrase in templates_for(type, lang, wording)

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

@lru_cache(maxsize=None)
def _position_templates(lang: str, wording: str) -> frozenset:
    return frozenset(templates_for("position", lang, wording))


def _pick_template(qtype: str, lang: str, rng: random.Random, wording: str) -> Tuple[int, str]:
    """(index in templates_for, template): uniform over the list, except in the trained wording, which
    draws a group by its share first (see TRAINED_SHARES)."""
    if wording != "trained":
        options = templates_for(qtype, lang, wording)
        index = rng.randrange(len(options))
        return index, options[index]
    groups = _groups(qtype, lang, wording)
    g = rng.choices(range(len(groups)), weights=[share for share, _ in groups])[0]
    group, offset = groups[g][1], sum(len(group) for _, group in groups[:g])
    j = rng.randrange(len(group))
    return offset + j, group[j]


def _typed_casually(prompt: str, lang: str, rng: random.Random) -> str:
    """One prompt in ten as people type them: no final punctuation, or (English) a lower-case start."""
    if rng.random() >= 0.1:
        return prompt
    if lang == "en" and rng.random() < 0.5:
        return prompt[:1].lower() + prompt[1:]
    return prompt.rstrip("?？。.")


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


def _kind_fields(kind: str, lang: str, rng: random.Random) -> dict:
    """Template fields naming a kind without a colour: {kind}, {a_kind}, {kinds}."""
    if lang == "zh":
        name = rng.choice(KIND_ZH_ALIASES[kind])
        return {"kind": name, "a_kind": name, "kinds": name}
    return {"kind": kind, "a_kind": f"{_article(kind)} {kind}", "kinds": kind + "s"}


def _exists_kind_qa(scene: Scene, template: str, lang: str, rng: random.Random) -> Tuple[str, str, dict]:
    """A yes/no question naming a kind only ("Is there a star?"): half of them about a kind that is
    there, answered with the colours of all its shapes ("Yes, there is a green star.")."""
    present = sorted({s.kind for s in scene.shapes}, key=SHAPE_KINDS.index)
    absent = [k for k in SHAPE_KINDS if k not in present]     # never empty: at most 3 shapes, 4 kinds
    kind = rng.choice(present) if rng.random() < 0.5 else rng.choice(absent)
    prompt = template.format(**_kind_fields(kind, lang, rng))
    colours = [s.colour for s in scene.ordered_shapes if s.kind == kind]
    zh = lang == "zh"
    if not colours:
        label = f"没有，图中没有{SHAPE_ZH[kind]}。" if zh else f"No, there is no {kind}."
    elif len(colours) == 1:
        obj = coloured_shape(colours[0], kind, lang)
        label = f"是的，图中有{obj}。" if zh else f"Yes, there is {_article(obj)} {obj}."
    else:
        objs = [coloured_shape(c, kind, lang) for c in colours]
        if zh:
            label = f"是的，图中有{NUMBER_ZH[len(objs)]}个{SHAPE_ZH[kind]}：" + "，".join(objs) + "。"
        else:
            listed = ", ".join(f"{_article(o)} {o}" for o in objs[:-1]) + f" and {_article(objs[-1])} {objs[-1]}"
            label = f"Yes, there are {NUMBER_EN[len(objs)]} {kind}s: {listed}."
    return prompt, label, {"exists": bool(colours), "colours": colours}


def make_qa(scene: Scene, qtype: str, lang: str, rng: random.Random, wording: str = "templates") -> QA:
    """One question of type `qtype` in language `lang` about `scene`, with its answer; its template is
    drawn from `wording` (see WORDINGS)."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}")
    zh = lang == "zh"
    index, template = _pick_template(qtype, lang, rng, wording)

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
    elif qtype == "exists" and ("{kind" in template or "{a_kind" in template):   # no colour named
        prompt, label, answer = _exists_kind_qa(scene, template, lang, rng)
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
    elif qtype == "absent" and template in _position_templates(lang, wording) and rng.random() < 0.5:
        # "Where is the red circle?" with no red circle (often a circle of another colour, or a red
        # shape of another kind, is there): the answer names what is not there
        colour, kind = _absent_pair(scene, rng)
        obj = coloured_shape(colour, kind, lang)
        prompt = template.format(ref=obj if zh else f"the {obj}")
        label = f"图中没有{obj}。" if zh else f"There is no {obj} in the picture."
        answer = {"absent": kind, "colour": colour}
    elif qtype == "absent":   # a colour or position question about a kind that is not in the scene
        kind = rng.choice([k for k in SHAPE_KINDS if not scene.kind_count(k)])
        ref = _kind_fields(kind, "zh", rng)["kind"] if zh else f"the {kind}"
        prompt = template.format(ref=ref)
        label = f"图中没有{SHAPE_ZH[kind]}。" if zh else f"There is no {kind} in the picture."
        answer = {"absent": kind}
    else:  # background
        prompt = template
        label = _scene_opening(scene, lang) + ("。" if zh else ".")
        answer = {"background": scene.background}
    if wording == "trained":
        prompt = _typed_casually(prompt, lang, rng)
    return QA(type=qtype, lang=lang, prompt=prompt, label=label, answer=answer, template=index)


def sample_qa(scene: Scene, rng: random.Random, lang: Optional[str] = None,
              types: Sequence[str] = PRETRAIN_TYPES, wording: str = "templates") -> QA:
    """A random question (type drawn uniformly from `types`; language 50/50 unless given)."""
    qtype = rng.choice(list(types))
    if lang is None:
        lang = rng.choice(LANGS)
    return make_qa(scene, qtype, lang, rng, wording)


def make_conversation(scene: Scene, rng: random.Random, lang: Optional[str] = None,
                      n_turns: Optional[int] = None, types: Sequence[str] = PRETRAIN_TYPES,
                      wording: str = "templates") -> List[QA]:
    """2 or 3 turns (distinct question types) about one scene, all in one language."""
    if lang is None:
        lang = rng.choice(LANGS)
    types = list(types)
    if n_turns is None:
        n_turns = rng.randint(2, 3)
    n_turns = min(n_turns, len(types))
    return [make_qa(scene, t, lang, rng, wording) for t in rng.sample(types, n_turns)]
