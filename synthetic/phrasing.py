"""Many natural ways to ask each question type, written as small patterns and expanded.

A pattern is a question template (fields {ref}, {a_kind}, {kinds}, {kind}, {a_obj}, {obj} as in
synthetic/qa.py) with alternatives in ASCII parentheses: "(What|Which) colour is {ref}(| here)?" stands
for four questions. The expansions are what the `trained` wording mixes in beside the
fixed templates. Why a grammar rather than a longer list: the bundled model learned the first listed
paraphrases by heart (81% on held-out rewordings, with "Can you ..." questions answered as yes/no
ones), so it has to see the same request wrapped in many ways ("Could you tell me ...", "I would like
to know ...", "你能告诉我...吗") to learn that the content words decide the answer.

Characters and letters outside the bundled tokenizer's pieces (你, 可, 想, capital P ...) are fine here:
they become byte pieces, whose embeddings this training teaches (tests check that every byte piece a
held-out question needs also occurs in training).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

_GROUP = re.compile(r"\(([^()]*)\)")


def expand(pattern: str) -> List[str]:
    """Every string the pattern stands for, in order: "a(b|c)d(|e)" -> abd, abde, acd, acde."""
    match = _GROUP.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    out: List[str] = []
    for option in match.group(1).split("|"):
        out += expand(head + option + tail)
    return out


def expand_all(patterns: Sequence[str]) -> List[str]:
    """The union of the patterns' expansions, first occurrence kept, double spaces collapsed."""
    seen: Dict[str, None] = {}
    for pattern in patterns:
        for text in expand(pattern):
            seen.setdefault(re.sub(r" {2,}", " ", text), None)
    return list(seen)


# ----------------------------------------------------------------------------- English

_IN_PIC = "(| in the picture| in the image| in this picture| in this image| here)"
_ASK = "(Can|Could|Would) you (tell me|say)"                 # ... ?
_TELL = "(Please tell me|Tell me|tell me|I want to know|I would like to know|I wonder)"   # ... .
_PIC = "(the image|this image|the picture|this picture|the scene)"
_OBJS = "(shapes|objects|things|items)"


def _asked(core: str) -> List[str]:
    """An indirect question wrapped as a request: "Could you tell me <core>?", "I wonder <core>." ..."""
    return [f"{_ASK} {core}?", f"{_TELL} {core}.", f"Do you know {core}?"]


EN: Dict[str, List[str]] = {
    "colour": [
        *_asked(f"(what|which) (colour|color) {{ref}} is{_IN_PIC}"),
        *_asked("the (colour|color) of {ref}"),
        f"(What|Which) (colour|color) is {{ref}}{_IN_PIC}?",
        "What (colour|color) (do you think|would you say) {ref} is?",
        f"(What|Which) (colour|color) does {{ref}} have{_IN_PIC}?",
        "What is the (colour|color) of {ref}(| here| in the picture)?",
        "(Name|Give) the (colour|color) of {ref}(|, please).",
        "(Colour|Color) of {ref}?",
    ],
    "shape": [
        *_asked(f"(what|which) shape {{ref}} (is|has){_IN_PIC}"),
        *_asked("(what kind|what sort|what type) of shape {ref} is"),
        *_asked("the shape of {ref}"),
        f"(What|Which) shape is {{ref}}{_IN_PIC}?",
        "What shape (do you think|would you say) {ref} is?",
        f"What shape does {{ref}} have{_IN_PIC}?",
        "(What|Which) (kind|sort|type) of shape is {ref}(| here)?",
        "Is {ref} a circle, a square, a triangle or a star?",
        "What is {ref}(| here| in the picture)?",
        "(Name|Give) the shape of {ref}(|, please).",
        "Shape of {ref}?",
    ],
    "position": [
        *_asked(f"where {{ref}} is( located|){_IN_PIC}"),
        *_asked("the (position|location) of {ref}"),
        f"Where (is|can I find|can I see|do I find) {{ref}}{_IN_PIC}?",
        "Where is {ref} (located|positioned)(| in the picture| in the image)?",
        "(Which|What) (part|side|area) of the (image|picture) is {ref} (in|on)?",
        "In (what|which) part of the (image|picture) (is|can I find|do I see) {ref}?",
        "What is the (position|location) of {ref}(| in the picture| in the image)?",
        "Where would (I|you) (find|see) {ref}?",
        "(Position|Location) of {ref}?",
    ],
    "count": [
        f"How many {_OBJS} (are there|are there in the (image|picture)|are in the (image|picture)|are in this (image|picture)|"
        "do you see|can you see|can you find|can you count|does the (image|picture) (have|contain))?",
        *_asked(f"how many {_OBJS} (there are|are in the (image|picture)|you (can |)see)"),
        f"(Please |)count the {_OBJS}(| in the (image|picture)| in this (image|picture)| for me).",
        f"(Can|Could|Would) you count the {_OBJS}(| in the (image|picture)| for me)?",
        f"What is the (number|count) of {_OBJS}(| in the (image|picture)| here)?",
        f"How many {_OBJS} (in total|altogether)?",
        f"Number of {_OBJS}?",
    ],
    "describe": [
        f"(Please describe|Describe) {_PIC}(| for me).",
        f"Describe {_PIC}, please.",
        f"(Please |)(briefly |)describe what you see(| in {_PIC}).",
        f"(Can|Could|Would) you (|briefly )describe {_PIC}(| for me)?",
        f"(Please |)give (me |)a (|short |brief )description of {_PIC}.",
        f"(Can|Could|Would) you give (me |)a (|short )description of {_PIC}?",
        f"What (is|can be seen|do you see|can you see|is there) in {_PIC}?",
        f"What does {_PIC} (show|contain|have in it)?",
        *_asked(f"what (is in|you see in) {_PIC}"),
        "What do you see(| here| in it)?",
        f"What (objects|shapes|things) (are|can you see) in {_PIC}?",
        f"Tell me about {_PIC}(|, please).",
        "(Please explain|Explain) what (you see|the picture shows|the image shows).",
    ],
    "exists_kind": [
        f"Is there (|any ){{a_kind}}{_IN_PIC}?",
        "(Do|Can|Could) you (see|spot) {a_kind}(| in the picture| in the image| here| anywhere)?",
        "Does (the|this) (image|picture) (contain|have|show|include) {a_kind}?",
        "Is {a_kind} (visible|present)(| in the picture| in the image)?",
        "(Do you know|Can you tell me|Could you tell me) (if|whether) there is {a_kind}(| in the picture| in the image)?",
        "(Tell me|Please tell me) (if|whether) there is {a_kind}(| in the picture).",
        "Are there (|any ){kinds}(| in the picture| in the image| here)?",
        "Any {kinds}(| here| in the picture)?",
        "Is there {a_kind}, yes or no?",
    ],
    "exists_obj": [
        f"Is there {{a_obj}}{_IN_PIC}?",
        "(Do|Can|Could) you (see|spot) {a_obj}(| in the picture| in the image| here| anywhere)?",
        "Does (the|this) (image|picture) (contain|have|show|include) {a_obj}?",
        "Is {a_obj} (visible|present)(| in the picture| in the image)?",
        "(Do you know|Can you tell me|Could you tell me) (if|whether) there is {a_obj}(| in the picture| in the image)?",
        "(Tell me|Please tell me) (if|whether) there is {a_obj}(| in the picture).",
    ],
}

# ----------------------------------------------------------------------------- Chinese

_PREF = "(|图中的|图里的|图上的|图片中的|图片里的|这张图里的|这张图片里的)"
_IMG = "(图中|图里|图上|图片里|图片中|图片上|这张图里|这张图上|这张图片里|这幅图里)"
_THINGS = "(图形|形状|物体|东西)"


def _asked_zh(core: str) -> List[str]:
    """"你能告诉我<core>吗？", "请说一下<core>。", "我想知道<core>。", "请问<core>？" ..."""
    return [f"(能|你能|可以|你可以)(告诉我|说一下|说说){core}吗？", f"能不能告诉我{core}？",
            f"(请|请你|)(告诉我|说一下){core}。", f"我想知道{core}。", f"你知道{core}吗？", f"请问{core}？"]


ZH: Dict[str, List[str]] = {
    "colour": [
        *_asked_zh(f"{_PREF}{{ref}}是什么颜色"),
        *_asked_zh(f"{_PREF}{{ref}}的颜色"),
        f"{_PREF}{{ref}}是(什么|哪个|哪种)颜色(|的)？",
        f"{_PREF}{{ref}}的颜色是(什么|哪个|哪种)？",
        "{ref}是什么颜色(呢|啊)？",
    ],
    "shape": [
        *_asked_zh(f"{_PREF}{{ref}}是什么形状"),
        *_asked_zh(f"{_PREF}{{ref}}的形状"),
        f"{_PREF}{{ref}}是(什么|哪个|哪种|个什么)形状(|的)？",
        f"{_PREF}{{ref}}的形状是(什么|哪个|哪种)？",
        f"{_PREF}{{ref}}是什么图形？",
        "{ref}是什么形状(呢|啊)？",
    ],
    "position": [
        *_asked_zh(f"{_PREF}{{ref}}在(哪里|哪儿|什么位置|哪个位置)"),
        *_asked_zh(f"{_PREF}{{ref}}的位置"),
        f"{_PREF}{{ref}}在(哪|哪里|哪儿|什么位置|哪个位置)？",
        "{ref}在图(|中|片|片中|片里)的(什么|哪个)位置？",
        f"{_PREF}{{ref}}的位置在(哪里|哪儿)？",
        f"{_PREF}{{ref}}位于(哪里|什么位置|哪个位置)？",
        "{ref}在哪里(呢|啊)？",
        f"{_PREF}{{ref}}在图(中|片里|上)的什么地方？",
    ],
    "count": [
        f"{_IMG}(一共|总共|)有(几|多少)个{_THINGS}(|呢)？",
        f"(请|)数一数{_IMG}有(几|多少)个{_THINGS}。",
        *_asked_zh(f"{_IMG}(一共|)有(几|多少)个{_THINGS}"),
        f"(你能|能|可以)数一下{_IMG}有几个{_THINGS}吗？",
        f"{_THINGS}的数量是多少？",
    ],
    "describe": [
        "(请|请你|)(描述|说说|介绍)一下(这张图片|这张图|图片|这幅图|图中的内容|图片的内容)。",
        "(能|你能|可以)(描述|说说|介绍)一下(这张图片|这张图|图片|这幅图|图片的内容)吗？",
        f"{_IMG}(有什么|有哪些东西|有些什么|都有什么|有哪些图形)？",
        "(这张图|这张图片|图片|这幅图)(上面|里面)有什么？",
        *_asked_zh("(这张图|图片|图)里有什么"),
        "这是一张什么样的图？",
        "(图中|这张图|图片上)画的是什么？",
    ],
    "exists_kind": [
        f"{_IMG}(有|能看到|可以看到|看得到)({{kind}})吗？",
        f"{_IMG}有没有{{kind}}？",
        f"{_IMG}是否有{{kind}}？",
        "你(|能)看到{kind}了吗？",
        "你能找一找(图中|图里)有没有{kind}吗？", "请找一找(图中|图里)有没有{kind}。",
        "(请问|)(图|图中|图片)(有|里有)没有{kind}？",
        *_asked_zh(f"{_IMG}有没有{{kind}}"),
    ],
    "exists_obj": [
        f"{_IMG}(有|能看到|可以看到)({{obj}})吗？",
        f"{_IMG}有没有{{obj}}？",
        f"{_IMG}是否有{{obj}}？",
        "你(|能)看到{obj}了吗？",
        *_asked_zh(f"{_IMG}有没有{{obj}}"),
    ],
}


@lru_cache(maxsize=None)
def _groups(qtype: str, lang: str) -> Tuple[Tuple[str, ...], ...]:
    table = ZH if lang == "zh" else EN
    patterns = table["exists_kind"] + table["exists_obj"] if qtype == "exists" else table.get(qtype, [])
    return tuple(tuple(expand_all([p])) for p in patterns)


def variant_groups(qtype: str, lang: str) -> List[List[str]]:
    """The questions of a type and language, one list per pattern (empty for types without patterns).
    Training draws a pattern first, then one of its questions, so that a pattern with many
    alternatives does not crowd out the others."""
    return [list(group) for group in _groups(qtype, lang)]
