"""Grading free-form answers against the structured answers of synthetic questions.

A response is right when it names the right colour / shape / count / position / yes-no, in either
language (digits, number words, full-width characters accepted). Words are matched longest first
and without overlaps, so "light blue" / "浅蓝色" are never read as "blue" / "蓝色", and "三角形" holds
no number. Naming anything else of the graded kind makes the answer wrong: "The circle is red and
blue." is wrong for a red circle, and so is naming the background colour in a shape-colour answer.
For 'count' the first number named is graded. For 'describe' every (colour, kind) pair of the
scene must be named, each colour next to its shape (in one clause), and no other pair. An 'exists'
answer that lists `colours` (questions that name no colour: "Is there a star?") must also name exactly
those colours ("Yes, there is a green star."; none after a no). An 'absent' answer must say no, name
the missing kind and nothing else of it: no place, and no colour unless the question named one
("Where is the red circle?" -> "There is no red circle in the picture.": that colour only).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

# Synonyms: canonical name -> phrases. English phrases are regular expressions matched on word
# boundaries; Chinese phrases are plain strings.
_COLOURS_EN: Dict[str, List[str]] = {
    "red": [r"red"], "green": [r"green"], "blue": [r"blue"], "yellow": [r"yellow"],
    "purple": [r"purple", r"violet"], "orange": [r"orange"], "white": [r"white"], "black": [r"black"],
    "gray": [r"gr[ae]y"], "light blue": [r"light[\s-]*blue", r"pale[\s-]*blue", r"sky[\s-]*blue"],
    "pink": [r"pink"],
}
_COLOURS_ZH: Dict[str, List[str]] = {
    "red": ["红色", "红"], "green": ["绿色", "绿"], "blue": ["蓝色", "蓝"], "yellow": ["黄色", "黄"],
    "purple": ["紫色", "紫"], "orange": ["橙色", "橙", "橘色", "橘黄色", "橘红色", "橘"],
    "white": ["白色", "白"], "black": ["黑色", "黑"], "gray": ["灰色", "灰"],
    "light blue": ["浅蓝色", "淡蓝色", "天蓝色", "浅蓝", "淡蓝", "天蓝"],
    "pink": ["粉色", "粉红色", "粉红", "粉"],
}
_SHAPES_EN: Dict[str, List[str]] = {
    "circle": [r"circles?", r"discs?"], "square": [r"squares?"], "triangle": [r"triangles?"],
    "star": [r"stars?"],
}
_SHAPES_ZH: Dict[str, List[str]] = {
    "circle": ["圆形", "圆圈", "圆"], "square": ["正方形", "方形", "方块", "正方块"],
    "triangle": ["三角形", "三角"], "star": ["星形", "星星", "五角星", "星"],
}
_POSITIONS_EN: Dict[str, List[str]] = {
    "top-left": [r"(?:top|upper)[\s-]*left", r"left[\s-]*(?:top|upper)"],
    "top-right": [r"(?:top|upper)[\s-]*right", r"right[\s-]*(?:top|upper)"],
    "bottom-left": [r"(?:bottom|lower)[\s-]*left", r"left[\s-]*(?:bottom|lower)"],
    "bottom-right": [r"(?:bottom|lower)[\s-]*right", r"right[\s-]*(?:bottom|lower)"],
    "top": [r"top", r"upper", r"(?:top|upper)[\s-]*(?:centre|center|middle)",
            r"(?:centre|center|middle)[\s-]*(?:top|upper)"],
    "bottom": [r"bottom", r"lower", r"(?:bottom|lower)[\s-]*(?:centre|center|middle)",
               r"(?:centre|center|middle)[\s-]*(?:bottom|lower)"],
    "left": [r"left", r"(?:centre|center|middle)[\s-]*left", r"left[\s-]*(?:centre|center|middle)"],
    "right": [r"right", r"(?:centre|center|middle)[\s-]*right", r"right[\s-]*(?:centre|center|middle)"],
    "centre": [r"centre", r"center", r"middle", r"central"],
}
_POSITIONS_ZH: Dict[str, List[str]] = {
    "top-left": ["左上角", "左上方", "左上"], "top-right": ["右上角", "右上方", "右上"],
    "bottom-left": ["左下角", "左下方", "左下"], "bottom-right": ["右下角", "右下方", "右下"],
    "top": ["上方", "上面", "上边", "上部", "顶部", "顶端", "正上方", "中上", "上方中间", "中间上方", "上方正中"],
    "bottom": ["下方", "下面", "下边", "下部", "底部", "底端", "正下方", "中下", "下方中间", "中间下方", "下方正中"],
    "left": ["左侧", "左边", "左方", "左面", "左部", "中间左侧", "左侧中间"],
    "right": ["右侧", "右边", "右方", "右面", "右部", "中间右侧", "右侧中间"],
    "centre": ["中间", "中央", "中心", "正中", "正中间", "正中央"],
}
_NUMBERS_EN: Dict[int, List[str]] = {
    0: [r"zero", r"none"], 1: [r"one", r"a single", r"single", r"only one"], 2: [r"two", r"a pair of"],
    3: [r"three"], 4: [r"four"], 5: [r"five"], 6: [r"six"], 7: [r"seven"], 8: [r"eight"], 9: [r"nine"],
    10: [r"ten"],
}
_NUMERALS_ZH = {"零": 0, "一": 1, "二": 2, "两": 2, "俩": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
                "八": 8, "九": 9, "十": 10}

Span = Tuple[int, int, str]   # (start, end, canonical value)


def normalise(text: str) -> str:
    """NFKC (full-width letters, digits and punctuation become ASCII) and lower case."""
    return unicodedata.normalize("NFKC", text or "").lower()


def _compile(en: Dict, zh: Dict) -> List[Tuple["re.Pattern", object]]:
    patterns = []
    for value, phrases in en.items():
        for phrase in phrases:
            patterns.append((re.compile(r"(?<![a-z])" + phrase + r"(?![a-z])"), value))
    for value, phrases in zh.items():
        for phrase in phrases:
            patterns.append((re.compile(re.escape(phrase)), value))
    return patterns


_COLOUR_PATTERNS = _compile(_COLOURS_EN, _COLOURS_ZH)
_SHAPE_PATTERNS = _compile(_SHAPES_EN, _SHAPES_ZH)
_POSITION_PATTERNS = _compile(_POSITIONS_EN, _POSITIONS_ZH)
_NUMBER_PATTERNS = _compile(_NUMBERS_EN, {})


def _find(text: str, patterns) -> List[Span]:
    """Non-overlapping matches, longest first, in text order."""
    found = []
    for pattern, value in patterns:
        for m in pattern.finditer(text):
            found.append((m.start(), m.end(), value))
    found.sort(key=lambda s: (-(s[1] - s[0]), s[0]))
    taken: List[Span] = []
    for span in found:
        if all(span[1] <= t[0] or span[0] >= t[1] for t in taken):
            taken.append(span)
    taken.sort()
    return taken


def _mask(text: str, spans: Iterable[Span]) -> str:
    chars = list(text)
    for start, end, _ in spans:
        for i in range(start, end):
            chars[i] = " "
    return "".join(chars)


def find_colours(text: str) -> List[Span]:
    return _find(normalise(text), _COLOUR_PATTERNS)


def find_shapes(text: str) -> List[Span]:
    return _find(normalise(text), _SHAPE_PATTERNS)


def find_positions(text: str) -> List[Span]:
    return _find(normalise(text), _POSITION_PATTERNS)


def find_numbers(text: str) -> List[Span]:
    """Numbers named: digits, English number words, Chinese numerals before a measure word.
    Shape words are masked first (三角形, 五角星 are not numbers)."""
    text = normalise(text)
    text = _mask(text, _find(text, _SHAPE_PATTERNS))
    spans = [(m.start(), m.end(), int(m.group())) for m in re.finditer(r"\d+", text)]
    spans += _find(text, _NUMBER_PATTERNS)
    numerals = "".join(_NUMERALS_ZH)
    for m in re.finditer(f"([{numerals}])\\s*(?:个|種|种|只|块|樣|样|件|处)", text):
        spans.append((m.start(), m.end(), _NUMERALS_ZH[m.group(1)]))
    whole = text.strip(" 。.!！")
    if len(whole) == 1 and whole in _NUMERALS_ZH:
        spans.append((0, len(text), _NUMERALS_ZH[whole]))
    return sorted(spans)


_NEGATIVE_EN = re.compile(r"(?<![a-z])(?:no|not|none|nope|cannot|isn't|aren't|doesn't|don't|can't|"
                          r"there's no|isnt|doesnt|dont|cant|without)(?![a-z])|n't")
_UNSURE = re.compile(r"(?:don't|do not|dont) know|not sure|(?:can't|cannot|can not) (?:tell|say|determine)|"
                     r"unclear|unsure|不知道|不确定|无法|不清楚|看不清")
_POSITIVE_EN = re.compile(r"(?<![a-z])(?:yes|yeah|yep|correct|there is|there's|there are|"
                          r"it does|i can see|i see|contains|does contain)(?![a-z])")


def find_yes_no(text: str) -> Optional[bool]:
    """True for yes, False for no, None when the response says neither or both."""
    text = normalise(text)
    if _UNSURE.search(text):
        return None
    # Drop echoes of the question forms "是否" and "有没有" before looking for negations.
    zh = text.replace("是否", "").replace("有没有", "")
    negative = bool(_NEGATIVE_EN.search(text)) or any(w in zh for w in ("没有", "没", "不", "否", "无"))
    explicit_yes = bool(re.search(r"(?<![a-z])(?:yes|yeah|yep)(?![a-z])", text)) or any(
        w in zh for w in ("是的", "对的", "对，", "对,", "有的"))
    if negative:
        return None if explicit_yes else False
    if explicit_yes or _POSITIVE_EN.search(text) or "有" in zh or zh.strip().startswith("是"):
        return True
    return None


def _clauses(text: str) -> List[Tuple[int, int]]:
    """(start, end) of clauses: split on punctuation and on 'and' / '和' / '以及' / '还有'."""
    bounds = [0]
    for m in re.finditer(r"[,.;:!?\n，。；：！？、]|(?<![a-z])and(?![a-z])|以及|还有|和|与|及", text):
        bounds.extend([m.start(), m.end()])
    bounds.append(len(text))
    return [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]


def find_coloured_shapes(text: str) -> List[Tuple[Optional[str], str]]:
    """(colour, kind) for every shape named, the colour being the nearest one in its clause."""
    text = normalise(text)
    colours = _find(text, _COLOUR_PATTERNS)
    shapes = _find(text, _SHAPE_PATTERNS)
    pairs = []
    for start, end in _clauses(text):
        in_colours = [c for c in colours if c[0] >= start and c[1] <= end]
        for s in shapes:
            if not (s[0] >= start and s[1] <= end):
                continue
            best = None
            for c in in_colours:
                distance = s[0] - c[1] if c[1] <= s[0] else c[0] - s[1]
                if best is None or distance < best[0]:
                    best = (distance, c[2])
            pairs.append((best[1] if best else None, s[2]))
    return pairs


def _values(spans: Sequence[Span]) -> set:
    return {s[2] for s in spans}


def grade(item_or_question_type: Union[dict, str], expected_answer_struct: Optional[dict] = None,
          response_text: str = "", lang: Optional[str] = None) -> bool:
    """Whether `response_text` correctly answers a question.

    `item_or_question_type` is a question type ('colour', ...) or a dataset item / conversation
    turn (a dict with 'type' and 'answer'), in which case `expected_answer_struct` may be None.
    `lang` is the question's language; answers in either language are accepted."""
    if isinstance(item_or_question_type, dict):
        qtype = item_or_question_type["type"]
        if expected_answer_struct is None:
            expected_answer_struct = item_or_question_type["answer"]
    else:
        qtype = item_or_question_type
    expected = expected_answer_struct or {}
    text = response_text or ""

    if qtype == "colour":
        return _values(find_colours(text)) == {expected["colour"]}
    if qtype == "background":
        return _values(find_colours(text)) == {expected["background"]}
    if qtype == "shape":
        return _values(find_shapes(text)) == {expected["shape"]}
    if qtype == "position":
        return _values(find_positions(text)) == {expected["position"]}
    if qtype == "count":
        numbers = find_numbers(text)
        return bool(numbers) and numbers[0][2] == int(expected["count"])
    if qtype == "exists":
        if "colours" in expected and _values(find_colours(text)) != set(expected["colours"]):
            return False
        return find_yes_no(text) is bool(expected["exists"])
    if qtype == "absent":
        colours = {expected["colour"]} if "colour" in expected else set()
        return (find_yes_no(text) is False and _values(find_shapes(text)) == {expected["absent"]}
                and _values(find_colours(text)) == colours and not find_positions(text))
    if qtype == "describe":
        wanted = {(s["colour"], s["kind"]) for s in expected["shapes"]}
        return set(find_coloured_shapes(text)) == wanted
    raise ValueError(f"unknown question type {qtype!r}")
