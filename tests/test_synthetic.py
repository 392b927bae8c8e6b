"""Tests of the synthetic data package (scenes, questions, grading, splits, few-shot zip) and of
evaluate.evaluate(). Fast and model-free."""
import importlib.util
import io
import json
import random
import re
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import grading
from synthetic.dataset import build_corpus, generate_split, load_split
from synthetic.fewshot import FEWSHOT_DIRNAME, build_fewshot_files, write_fewshot_zip
from synthetic.grading import grade
from synthetic.qa import (HELD_OUT, LANGS, MORE_TEMPLATES, NEW_TYPES, PRETRAIN_TYPES, QUESTION_TYPES, REWORDINGS,
                          REWORDINGS_2, TEMPLATES, WORDINGS, make_conversation, make_qa, sample_qa, templates_for)
from synthetic.scenes import (BACKGROUND_COLOURS, CELLS, IMAGE_SIZE, SHAPE_COLOURS, SHAPE_KINDS, Scene, Shape,
                              cell_box, sample_scene)

REPO = Path(__file__).resolve().parent.parent


def _load_evaluate_module():
    spec = importlib.util.spec_from_file_location("visualglm_evaluate", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- scenes

def test_scene_sampling_is_deterministic_and_varied():
    a = [sample_scene(random.Random(11)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(400)]
    assert {s.background for s in scenes} == set(BACKGROUND_COLOURS)
    assert {sh.colour for s in scenes for sh in s.shapes} == set(SHAPE_COLOURS)
    assert {sh.kind for s in scenes for sh in s.shapes} == set(SHAPE_KINDS)
    assert {sh.cell for s in scenes for sh in s.shapes} == set(CELLS)
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    assert np.array_equal(scenes[0].render_array(), scenes[0].render_array())


def test_scenes_respect_constraints_and_pixels():
    rng = random.Random(123)
    for _ in range(150):
        scene = sample_scene(rng)
        pixels = np.asarray(scene.render())
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.uint8
        bg = BACKGROUND_COLOURS[scene.background]
        for y, x in [(0, 0), (0, IMAGE_SIZE - 1), (IMAGE_SIZE - 1, 0), (IMAGE_SIZE - 1, IMAGE_SIZE - 1)]:
            assert tuple(pixels[y, x]) == bg
        assert len({s.cell for s in scene.shapes}) == len(scene.shapes)
        assert len({(s.colour, s.kind) for s in scene.shapes}) == len(scene.shapes)
        masks = []
        for shape in scene.shapes:
            assert shape.colour != scene.background
            assert SHAPE_COLOURS[shape.colour] != bg
            cx, cy = shape.centre
            assert tuple(pixels[int(cy), int(cx)]) == SHAPE_COLOURS[shape.colour]
            mask = shape.mask()
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = cell_box(shape.cell)
            assert xs.min() >= x0 and xs.max() + 1 <= x1 + 1e-9 and ys.min() >= y0 and ys.max() + 1 <= y1 + 1e-9
            # large enough to be seen through 14-px patches
            assert xs.max() - xs.min() >= 28 and ys.max() - ys.min() >= 28
            masks.append(mask)
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not np.any(masks[i] & masks[j])
        untouched = ~np.any(np.stack(masks), axis=0)
        assert np.all(pixels[untouched] == np.array(bg, dtype=np.uint8))


def test_scene_rejects_invalid_layouts():
    with pytest.raises(ValueError):
        Scene("white", (Shape("circle", "white", "top"),))
    with pytest.raises(ValueError):
        Scene("black", (Shape("circle", "red", "top"), Shape("star", "blue", "top")))
    with pytest.raises(ValueError):
        Scene("black", (Shape("circle", "red", "top"), Shape("circle", "red", "left")))
    scene = Scene("gray", (Shape("star", "red", "left"),))
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


# ----------------------------------------------------------------------------- questions

@pytest.mark.parametrize("wording", WORDINGS)
def test_every_type_in_both_languages_with_paraphrases(wording):
    rng = random.Random(5)
    templates = defaultdict(set)
    prompts = defaultdict(set)
    for _ in range(600):
        scene = sample_scene(rng)
        for qtype in QUESTION_TYPES:
            for lang in LANGS:
                qa = make_qa(scene, qtype, lang, rng, wording)
                templates[(qtype, lang)].add(qa.template)
                prompts[(qtype, lang)].add(qa.prompt)
                assert grade(qa.type, qa.answer, qa.label, lang), qa
                assert not qa.prompt.startswith(("问：", "Q:")) and "答：" not in qa.prompt
                if lang == "zh":
                    assert re.search(r"[\u4e00-\u9fff]", qa.prompt) and re.search(r"[\u4e00-\u9fff]", qa.label)
                    assert qa.label.endswith("。")
                else:
                    assert qa.prompt.isascii() and qa.label.isascii() and qa.label.endswith(".")
    for qtype in QUESTION_TYPES:
        for lang in LANGS:
            assert len(templates_for(qtype, lang, wording)) >= 3
            assert len(templates[(qtype, lang)]) >= 3, (qtype, lang)
            assert len(prompts[(qtype, lang)]) >= 3


def test_example_answers():
    scene = Scene("light blue", (Shape("circle", "red", "top-left"), Shape("star", "blue", "centre")))
    rng = random.Random(0)
    assert make_qa(scene, "colour", "en", rng).label in ("The circle is red.", "The star is blue.")
    assert make_qa(scene, "colour", "zh", rng).label in ("圆形是红色的。", "星形是蓝色的。")
    assert make_qa(scene, "position", "en", rng).label in ("The circle is in the top-left corner.",
                                                           "The star is in the centre.")
    assert make_qa(scene, "position", "zh", rng).label in ("圆形在左上角。", "星形在中间。")
    # the background answer is the opening of a description (see qa._scene_opening)
    assert make_qa(scene, "background", "zh", rng).label == "在浅蓝色背景上，图中有两个图形。"
    assert make_qa(scene, "background", "en", rng).label == "There are two shapes on a light blue background."
    assert make_qa(scene, "count", "zh", rng).label == "图中有两个图形。"
    assert make_qa(scene, "count", "en", rng).label == "There are two shapes."
    assert make_qa(scene, "describe", "en", rng).label == (
        "There are two shapes on a light blue background: a red circle in the top-left corner and a blue star "
        "in the centre.")
    assert make_qa(scene, "describe", "zh", rng).label == (
        "在浅蓝色背景上，图中有两个图形：左上角有一个红色的圆形，中间有一个蓝色的星形。")


def test_shape_kind_named_alone_only_when_unique():
    scene = Scene("white", (Shape("circle", "red", "top-left"), Shape("circle", "blue", "centre"),
                            Shape("star", "red", "bottom")))
    rng = random.Random(1)
    for _ in range(200):
        colour_q = make_qa(scene, "colour", "en", rng)
        if "circle" in colour_q.prompt:
            assert "top-left corner" in colour_q.prompt or "centre" in colour_q.prompt
        position_q = make_qa(scene, "position", "en", rng)
        if "circle" in position_q.prompt:
            assert "red circle" in position_q.prompt or "blue circle" in position_q.prompt
        zh = make_qa(scene, "position", "zh", rng)
        if "圆形" in zh.prompt:
            assert "红色的圆形" in zh.prompt or "蓝色的圆形" in zh.prompt
        shape_q = make_qa(scene, "shape", "en", rng)
        if "red" in shape_q.prompt:
            assert "top-left corner" in shape_q.prompt or "at the bottom" in shape_q.prompt


def test_exists_is_balanced_and_negatives_are_absent():
    rng = random.Random(9)
    answers = []
    for _ in range(1000):
        scene = sample_scene(rng)
        qa = make_qa(scene, "exists", rng.choice(LANGS), rng)
        answers.append(qa.answer["exists"])
        colour = next(c for c in SHAPE_COLOURS if (c in qa.prompt) or (grading._COLOURS_ZH[c][0] in qa.prompt))
        kinds = [k for k in SHAPE_KINDS if k in qa.prompt or grading._SHAPES_ZH[k][0] in qa.prompt]
        assert len(kinds) == 1
        assert scene.has(colour, kinds[0]) == qa.answer["exists"]
    assert 0.45 < sum(answers) / len(answers) < 0.55


def test_conversations():
    rng = random.Random(3)
    for _ in range(100):
        turns = make_conversation(sample_scene(rng), rng)
        assert 2 <= len(turns) <= 3
        assert len({t.type for t in turns}) == len(turns)
        assert len({t.lang for t in turns}) == 1
        assert "background" not in {t.type for t in turns}


# ----------------------------------------------------------------------------- wordings (issue 12, item 7)

def _fills(template: str, prompt: str) -> bool:
    """Whether `prompt` is `template` with its fields filled in."""
    return bool(re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)), prompt))


def _surface(template: str) -> str:
    """A template as a reader sees it: case, punctuation, spaces and color/colour do not make it new."""
    text = template.lower().replace("color", "colour")
    return re.sub(r"[\s?？。.!！,，]", "", text)


def test_rewordings_never_appear_in_training():
    """The held-out lists must stay held out: no held-out question is (up to case, punctuation and
    spelling) any template of any type that the trained mix asks."""
    trained = {_surface(t) for qtype in QUESTION_TYPES for lang in LANGS for t in templates_for(qtype, lang, "trained")}
    assert set(HELD_OUT) == {"rewordings", "rewordings2"}
    for name, table in HELD_OUT.items():
        held_out = [t for by_lang in table.values() for ts in by_lang.values() for t in ts]
        assert len(held_out) >= 4 * 6 * 2
        assert not {_surface(t) for t in held_out} & trained, (name, sorted({_surface(t) for t in held_out} & trained))
        for qtype in PRETRAIN_TYPES:
            for lang in LANGS:
                assert len(table[qtype][lang]) >= 4 and len(MORE_TEMPLATES[qtype][lang]) >= 4, (qtype, lang)
    # the trained mix keeps every original template (so they stay answered) and the examples
    for qtype, by_lang in TEMPLATES.items():
        for lang, ts in by_lang.items():
            assert set(ts) <= set(templates_for(qtype, lang, "trained"))
    assert "这张图片里有几个图形？" in MORE_TEMPLATES["count"]["zh"]
    assert {"Is there {a_kind}?", "Can you see {a_kind}?"} <= set(MORE_TEMPLATES["exists"]["en"])
    assert "图里有{kind}吗？" in MORE_TEMPLATES["exists"]["zh"]


def _byte_pieces(sp, text):
    return {p for p in sp.encode(text, out_type=str) if p.startswith("<0x")}


def test_held_out_questions_need_no_piece_that_training_never_shows():
    """Characters outside the bundled tokenizer's pieces become byte pieces: questions may use them (people
    type 你 and capital letters), but a held-out question must not need a byte piece that no trained
    question contains (its embedding would be untrained), and answers never use byte pieces (the model
    has to write them)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(REPO / "pretrained" / "visualglm-tiny" / "ice_text.model"))
    rng = random.Random(4)
    pieces = defaultdict(set)
    labels = []
    for wording in WORDINGS:
        for _ in range(1500 if wording == "trained" else 200):
            scene = sample_scene(rng)
            for qtype in QUESTION_TYPES:
                qa = make_qa(scene, qtype, rng.choice(LANGS), rng, wording)
                pieces[wording] |= _byte_pieces(sp, qa.prompt)
                labels.append(qa.label)
    assert not [t for t in labels if _byte_pieces(sp, t)]
    assert pieces["templates"] == set()            # the first training had none
    assert {"<0x50>", "<0xE4>"} <= pieces["trained"]      # "Please", 你
    for name in HELD_OUT:
        held = {p for by_lang in HELD_OUT[name].values() for ts in by_lang.values() for t in ts
                for p in _byte_pieces(sp, t)}
        assert held <= pieces["trained"], (name, held - pieces["trained"])


def test_phrasing_patterns_expand_every_alternative():
    from synthetic.phrasing import expand, expand_all, variant_groups
    assert expand("a(b|c)d(|e)") == ["abd", "abde", "acd", "acde"]
    assert expand("no groups {ref}?") == ["no groups {ref}?"]
    assert expand_all(["(x |)y", "y"]) == ["x y", "y"]
    for qtype in PRETRAIN_TYPES:
        for lang in LANGS:
            groups = variant_groups(qtype, lang)
            assert len(groups) >= 5 and all(groups), (qtype, lang)
            for t in (t for g in groups for t in g):
                assert "(" not in t and "|" not in t and "  " not in t, t
                assert t.format(ref="R", a_kind="K", kinds="K", kind="K", a_obj="O", obj="O")


def test_trained_wording_draws_by_group_share_and_types_some_prompts_casually():
    """40% of trained questions come from the original templates whatever the number of patterns, the
    patterns give many distinct questions, and about one prompt in ten has no final punctuation or
    (English) starts in lower case."""
    rng = random.Random(8)
    original = casual = 0
    distinct = defaultdict(set)
    n = 4000
    for _ in range(n):
        scene = sample_scene(rng)
        qtype, lang = rng.choice(PRETRAIN_TYPES), rng.choice(LANGS)
        qa = make_qa(scene, qtype, lang, rng, "trained")
        template = templates_for(qtype, lang, "trained")[qa.template]
        original += template in TEMPLATES[qtype][lang]
        casual += not qa.prompt.endswith(("?", "？", ".", "。")) or qa.prompt[:1].islower()
        distinct[(qtype, lang)].add(qa.prompt)
    assert 0.36 < original / n < 0.44, original / n
    assert 0.06 < casual / n < 0.14, casual / n
    assert all(len(v) > 100 for v in distinct.values()), {k: len(v) for k, v in distinct.items()}


def test_colourless_yes_no_questions_answer_with_the_true_colours():
    rng = random.Random(12)
    seen = Counter()
    for _ in range(1500):
        scene = sample_scene(rng)
        lang = rng.choice(LANGS)
        qa = make_qa(scene, "exists", lang, rng, "trained")
        if "colours" not in qa.answer:
            continue
        kinds = sorted({v for _, _, v in grading.find_shapes(qa.prompt)})
        assert len(kinds) == 1, qa.prompt
        assert not grading.find_colours(qa.prompt), qa.prompt          # the question names no colour
        truth = [s.colour for s in scene.ordered_shapes if s.kind == kinds[0]]
        assert qa.answer == {"exists": bool(truth), "colours": truth}
        assert {c for _, _, c in grading.find_colours(qa.label)} == set(truth)
        assert grade(qa.type, qa.answer, qa.label, lang)
        seen[(lang, bool(truth), len(truth) > 1)] += 1
    # both languages, yes and no about equally often, and answers listing two or three shapes
    assert all(seen[(lang, present, False)] > 50 for lang in LANGS for present in (True, False)), seen
    assert seen[("en", True, True)] and seen[("zh", True, True)]


def test_absent_questions_are_about_a_kind_that_is_not_there():
    rng = random.Random(13)
    seen = Counter()
    for wording in WORDINGS:
        for _ in range(300):
            scene = sample_scene(rng)
            lang = rng.choice(LANGS)
            qa = make_qa(scene, "absent", lang, rng, wording)
            kind, colour = qa.answer["absent"], qa.answer.get("colour")
            assert {v for _, _, v in grading.find_shapes(qa.prompt)} == {kind}
            assert grade(qa.type, qa.answer, qa.label, lang)
            if colour is None:
                assert scene.kind_count(kind) == 0
                assert qa.label in (f"There is no {kind} in the picture.", f"图中没有{grading._SHAPES_ZH[kind][0]}。")
                continue
            # a coloured shape that is not there; the question asks where it is
            assert not scene.has(colour, kind)
            assert {v for _, _, v in grading.find_colours(qa.prompt)} == {colour}
            assert qa.label in (f"There is no {colour} {kind} in the picture.",
                                f"图中没有{grading._COLOURS_ZH[colour][0]}的{grading._SHAPES_ZH[kind][0]}。")
            seen[(wording, scene.kind_count(kind) > 0)] += 1
    # in every wording, some about a kind that is there in another colour (the near miss) and some not
    assert all(seen[(w, near)] for w in WORDINGS for near in (True, False)), seen


def test_wordings_differ_but_the_default_stays_the_original_templates():
    rng = random.Random(6)
    scene = sample_scene(rng)
    for qtype in PRETRAIN_TYPES:
        for lang in LANGS:
            assert templates_for(qtype, lang) == TEMPLATES[qtype][lang]
            assert set(templates_for(qtype, lang, "rewordings")) == set(REWORDINGS[qtype][lang])
            assert set(templates_for(qtype, lang, "rewordings2")) == set(REWORDINGS_2[qtype][lang])
    # the same seed gives the same items as before the wordings existed (the few-shot zip test checks the
    # bytes); the other wordings ask other questions, about the same scenes
    a = generate_split_items(seed=7)
    assert a == generate_split_items(seed=7, wording="templates")
    assert {it["type"] for it in a} <= set(PRETRAIN_TYPES) | {"multi_turn"}
    b = generate_split_items(seed=7, wording="trained")
    assert {it["type"] for it in b} >= set(NEW_TYPES) and a != b
    with pytest.raises(ValueError, match="unknown wording"):
        make_qa(scene, "count", "en", rng, "slang")


def generate_split_items(seed, **options):
    from synthetic.dataset import generate_items
    return [it for _, _, items in generate_items(200, seed, render=False, **options) for it in items]


def test_trained_stream_mixes_old_and_new_questions():
    """`synthetic:<n>:<seed>:trained` (the continued training): new forms and enough of the original
    templates that those stay answered; the background question stays held out."""
    import pickle
    from synthetic.stream import generated_entry, parse_spec
    size, seed = parse_spec("synthetic:1000:9:trained")
    assert (size, seed, seed.wording) == (1000, 9, "trained")
    assert pickle.loads(pickle.dumps(seed)).wording == "trained"       # loader workers get the wording
    assert parse_spec("synthetic:1000:9")[1].wording == "templates"
    with pytest.raises(ValueError, match="wording"):
        parse_spec("synthetic:1000:9:slang")
    types, original, new = Counter(), 0, 0
    for i in range(400):
        entry, _ = generated_entry(i, seed)
        for turn in entry.get("conversations", [entry]):
            types[turn["type"]] += 1
            known = turn["type"] != "absent" and any(_fills(t, turn["prompt"])
                                                     for t in TEMPLATES[turn["type"]][entry["lang"]])
            original += known
            new += not known
            assert grade(turn, None, turn["label"], entry["lang"])
    assert set(types) == set(PRETRAIN_TYPES) | set(NEW_TYPES)
    assert 0.3 < original / (original + new) < 0.6, (original, new)


# ----------------------------------------------------------------------------- splits

def test_generate_split_deterministic(tmp_path):
    a = generate_split(tmp_path / "a" / "split", 12, seed=4, multi_turn_fraction=0.3)
    b = generate_split(tmp_path / "b" / "split", 12, seed=4, multi_turn_fraction=0.3)
    assert a == b
    fa, fb = _files(tmp_path / "a" / "split"), _files(tmp_path / "b" / "split")
    assert fa == fb and len(fa) == 13
    generate_split(tmp_path / "c" / "split", 12, seed=5, multi_turn_fraction=0.3)
    fc = _files(tmp_path / "c" / "split")
    assert fc["dataset.json"] != fa["dataset.json"]
    assert sum(fa[n] != fc[n] for n in fa if n.endswith(".png")) >= 10


def test_split_format(tmp_path):
    items = generate_split(tmp_path / "train", 60, seed=1, multi_turn_fraction=0.3)
    on_disk = json.loads((tmp_path / "train" / "dataset.json").read_text(encoding="utf-8"))
    assert on_disk == items
    multi = [it for it in items if "conversations" in it]
    single = [it for it in items if "conversations" not in it]
    assert multi and single
    for item in items:
        assert item["img"].startswith("train/") and (tmp_path / item["img"]).is_file()
        assert item["lang"] in LANGS
        if "conversations" in item:
            assert item["type"] == "multi_turn" and 2 <= len(item["conversations"]) <= 3
            assert item["answer"] == [t["answer"] for t in item["conversations"]]
            for turn in item["conversations"]:
                assert set(turn) >= {"prompt", "label", "type", "answer"}
                assert grade(turn, None, turn["label"], item["lang"])
        else:
            assert set(item) == {"img", "prompt", "label", "type", "lang", "answer"}
            assert grade(item, None, item["label"], item["lang"])
    loaded = load_split(tmp_path / "train")
    assert all(Path(it["img"]).is_absolute() and Path(it["img"]).is_file() for it in loaded)
    with Image.open(loaded[0]["img"]) as im:
        assert im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB"


def test_background_held_out(tmp_path):
    items = generate_split(tmp_path / "pre", 150, seed=3, multi_turn_fraction=0.4)
    types = Counter(t["type"] for it in items for t in it.get("conversations", [it]))
    assert "background" not in types and set(types) == set(PRETRAIN_TYPES)
    items = generate_split(tmp_path / "all", 150, seed=3, multi_turn_fraction=0.4, include_background=True)
    types = Counter(t["type"] for it in items for t in it.get("conversations", [it]))
    assert set(types) == set(PRETRAIN_TYPES) | {"background"}
    with pytest.raises(ValueError):
        generate_split(tmp_path / "bad", 2, seed=3, types=["background"])
    only = generate_split(tmp_path / "bg", 10, seed=3, types=["background"], include_background=True)
    assert {it["type"] for it in only} == {"background"}
    rng = random.Random(0)
    assert all(sample_qa(sample_scene(rng), rng).type != "background" for _ in range(300))


def test_corpus():
    corpus = build_corpus(n_images=50, seed=0)
    text = "\n".join(corpus)
    assert all(isinstance(t, str) and t for t in corpus)
    for word in ("浅蓝色", "粉色", "灰色", "light blue", "background", "背景", "三角形", "右下角", "Describe"):
        assert word in text
    assert build_corpus(n_images=50, seed=0) == corpus


# ----------------------------------------------------------------------------- grading

@pytest.mark.parametrize("qtype, answer, response", [
    ("colour", {"colour": "red"}, "The circle is red."),
    ("colour", {"colour": "red"}, "圆形是红色的。"),
    ("colour", {"colour": "red"}, "红的"),
    ("colour", {"colour": "blue"}, "It's BLUE！"),
    ("colour", {"colour": "gray"}, "grey"),
    ("background", {"background": "light blue"}, "The background is light-blue."),
    ("background", {"background": "light blue"}, "背景是浅蓝色的。"),
    ("background", {"background": "pink"}, "背景是粉红色"),
    ("background", {"background": "yellow"}, "黄色。"),
    ("shape", {"shape": "triangle"}, "The red object is a triangle."),
    ("shape", {"shape": "triangle"}, "红色的图形是三角形。"),
    ("shape", {"shape": "star"}, "五角星"),
    ("shape", {"shape": "circle"}, "It is a circle"),
    ("count", {"count": 2}, "There are two shapes."),
    ("count", {"count": 2}, "图中有两个图形。"),
    ("count", {"count": 2}, "２"),
    ("count", {"count": 3}, "There are 3 shapes."),
    ("count", {"count": 3}, "三个"),
    ("count", {"count": 1}, "图中有1个三角形。"),
    ("count", {"count": 1}, "There is only one shape."),
    ("position", {"position": "top-left"}, "The circle is in the top-left corner."),
    ("position", {"position": "top-left"}, "upper left"),
    ("position", {"position": "top-left"}, "圆形在左上角。"),
    ("position", {"position": "top"}, "It is at the top."),
    ("position", {"position": "top"}, "在上方中间"),
    ("position", {"position": "centre"}, "It's in the middle of the image."),
    ("position", {"position": "centre"}, "中间"),
    ("position", {"position": "bottom-right"}, "右下角"),
    ("position", {"position": "left"}, "The red circle is on the left."),
    ("exists", {"exists": True}, "Yes, there is a red circle."),
    ("exists", {"exists": True}, "是的，图中有红色的圆形。"),
    ("exists", {"exists": True}, "有。"),
    ("exists", {"exists": False}, "No, there is no red circle."),
    ("exists", {"exists": False}, "没有，图中没有红色的圆形。"),
    ("exists", {"exists": False}, "There isn't one."),
    ("exists", {"exists": False}, "不，没有。"),
    # a question naming no colour ("Is there a star?"): the answer names the colours that are there
    ("exists", {"exists": True, "colours": ["green"]}, "Yes, there is a green star."),
    ("exists", {"exists": True, "colours": ["green", "red"]}, "Yes, there are two stars: a green star and a red star."),
    ("exists", {"exists": True, "colours": ["green", "red"]}, "是的，图中有两个星形：绿色的星形，红色的星形。"),
    ("exists", {"exists": False, "colours": []}, "No, there is no star."),
    ("exists", {"exists": False, "colours": []}, "没有，图中没有星形。"),
    ("absent", {"absent": "circle"}, "There is no circle in the picture."),
    ("absent", {"absent": "circle"}, "图中没有圆形。"),
    ("absent", {"absent": "star"}, "There are no stars."),
    ("absent", {"absent": "star"}, "图里没有星星。"),
    ("absent", {"absent": "circle", "colour": "red"}, "There is no red circle in the picture."),
    ("absent", {"absent": "circle", "colour": "red"}, "图中没有红色的圆形。"),
    ("describe", {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"},
                             {"colour": "blue", "kind": "star", "position": "centre"}]},
     "There are two shapes: a red circle in the top-left corner and a blue star in the centre."),
    ("describe", {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"},
                             {"colour": "blue", "kind": "star", "position": "centre"}]},
     "图中有两个图形：左上角有一个红色的圆形，中间有一个蓝色的星形。"),
    ("describe", {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"},
                             {"colour": "blue", "kind": "star", "position": "centre"}]},
     "A blue star and a red circle on a white background."),
    ("describe", {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"}]},
     "The circle is red."),
])
def test_grade_accepts(qtype, answer, response):
    assert grade(qtype, answer, response, "en")
    assert grade(qtype, answer, response, "zh")


@pytest.mark.parametrize("qtype, answer, response", [
    ("colour", {"colour": "blue"}, "The circle is light blue."),       # substring trap
    ("colour", {"colour": "blue"}, "圆形是浅蓝色的。"),
    ("colour", {"colour": "red"}, "背景是粉红色的。"),
    ("colour", {"colour": "red"}, "The circle is red and blue."),      # wrong extra colour
    ("colour", {"colour": "red"}, "圆形是红色的，背景是黄色的。"),      # background named too
    ("colour", {"colour": "red"}, "The circle is green."),
    ("colour", {"colour": "red"}, "I don't know."),
    ("colour", {"colour": "red"}, "The circle is colored."),            # 'red' inside a word
    ("background", {"background": "light blue"}, "The background is blue."),
    ("background", {"background": "light blue"}, "背景是蓝色的。"),
    ("background", {"background": "pink"}, "背景是红色的。"),
    ("background", {"background": "yellow"}, "背景是橘黄色的。"),
    ("shape", {"shape": "square"}, "It is a circle."),
    ("shape", {"shape": "square"}, "圆形"),
    ("shape", {"shape": "square"}, "a square and a circle"),
    ("count", {"count": 3}, "图中有一个三角形。"),                      # 三 of 三角形 is no number
    ("count", {"count": 2}, "There are three shapes."),
    ("count", {"count": 2}, "图中有三个图形。"),
    ("count", {"count": 2}, "shapes"),
    ("position", {"position": "top-left"}, "It is at the top."),       # 'top' is not 'top-left'
    ("position", {"position": "top"}, "It is in the top-left corner."),
    ("position", {"position": "top"}, "圆形在左上角。"),
    ("position", {"position": "top-left"}, "圆形在上方。"),
    ("position", {"position": "left"}, "It is on the right."),
    ("position", {"position": "centre"}, "top or centre"),
    ("exists", {"exists": True}, "No, there is no red circle."),
    ("exists", {"exists": True}, "没有，图中没有红色的圆形。"),
    ("exists", {"exists": False}, "Yes, there is a red circle."),
    ("exists", {"exists": False}, "是的，图中有红色的圆形。"),
    ("exists", {"exists": False}, "I don't know."),
    ("exists", {"exists": True}, "I'm not sure."),
    ("exists", {"exists": False}, ""),
    ("exists", {"exists": True, "colours": ["green"]}, "No, there is no white star."),   # issue 12's answer
    ("exists", {"exists": True, "colours": ["green"]}, "Yes, there is a white star."),   # wrong colour
    ("exists", {"exists": True, "colours": ["green", "red"]}, "Yes, there is a green star."),   # one missing
    ("exists", {"exists": False, "colours": []}, "No, there is no white star."),   # invents a colour
    ("exists", {"exists": False, "colours": []}, "Yes, there is a star."),
    ("absent", {"absent": "circle"}, "The circle is red."),            # believes the premise
    ("absent", {"absent": "circle"}, "The circle is in the top-left corner."),
    ("absent", {"absent": "circle"}, "圆形在左上角。"),
    ("absent", {"absent": "circle", "colour": "red"}, "The red circle is in the top-left corner."),
    ("absent", {"absent": "circle", "colour": "red"}, "There is no blue circle in the picture."),
    ("absent", {"absent": "circle", "colour": "red"}, "There is no circle in the picture."),
    ("absent", {"absent": "circle"}, "There is no red circle."),       # names a colour
    ("absent", {"absent": "circle"}, "There is no star in the picture."),   # the wrong kind
    ("absent", {"absent": "circle"}, "Yes, there is a circle."),
    ("absent", {"absent": "circle"}, ""),
    ("describe", {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"},
                             {"colour": "blue", "kind": "star", "position": "centre"}]},
     "A blue circle and a red star."),                                  # colours swapped
    ("describe", {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"},
                             {"colour": "blue", "kind": "star", "position": "centre"}]},
     "A red circle."),                                                  # a shape missing
    ("describe", {"shapes": [{"colour": "red", "kind": "circle", "position": "top-left"}]},
     "A red circle and a green square."),                               # an extra shape
    ("describe", {"shapes": [{"colour": "blue", "kind": "circle", "position": "top-left"}]},
     "一个浅蓝色的圆形。"),
])
def test_grade_rejects(qtype, answer, response):
    assert not grade(qtype, answer, response, "en")
    assert not grade(qtype, answer, response, "zh")


def test_grade_takes_items():
    item = {"type": "colour", "answer": {"colour": "purple"}, "lang": "en"}
    assert grade(item, None, "It is violet.")
    assert not grade(item, None, "It is pink.")
    with pytest.raises(ValueError):
        grade("nonsense", {}, "x", "en")


# ----------------------------------------------------------------------------- evaluate()

_OTHER_COLOUR = {c: o for c, o in zip(SHAPE_COLOURS, list(SHAPE_COLOURS)[1:] + list(SHAPE_COLOURS)[:1])}
_OTHER_BG = {c: o for c, o in zip(BACKGROUND_COLOURS, list(BACKGROUND_COLOURS)[1:] + list(BACKGROUND_COLOURS)[:1])}
_OTHER_KIND = {k: o for k, o in zip(SHAPE_KINDS, SHAPE_KINDS[1:] + SHAPE_KINDS[:1])}
_OTHER_CELL = {c: o for c, o in zip(CELLS, CELLS[1:] + CELLS[:1])}


def _wrong_answer(qtype, answer):
    if qtype == "colour":
        return f"It is {_OTHER_COLOUR[answer['colour']]}."
    if qtype == "background":
        return f"The background is {_OTHER_BG[answer['background']]}."
    if qtype == "shape":
        return f"It is a {_OTHER_KIND[answer['shape']]}."
    if qtype == "count":
        return f"There are {answer['count'] % 3 + 1} shapes."
    if qtype == "position":
        return f"It is {_OTHER_CELL[answer['position']]}."
    if qtype == "exists":
        return "No." if answer["exists"] else "Yes."
    if qtype == "describe":
        return " and ".join(f"a {_OTHER_COLOUR[s['colour']]} {s['kind']}" for s in answer["shapes"])
    if qtype == "absent":
        return f"The {answer['absent']} is red."
    raise AssertionError(qtype)


def _truth_table(items):
    table = {}
    for item in items:
        for turn in item.get("conversations", [item]):
            table[(item["img"], turn["prompt"])] = (turn["type"], turn["answer"], turn["label"])
    return table


def test_evaluate_with_fake_answer_fns(tmp_path):
    ev = _load_evaluate_module()
    generate_split(tmp_path / "ev", 80, seed=2, multi_turn_fraction=0.3, include_background=True, wording="trained")
    items = load_split(tmp_path / "ev")
    truth = _truth_table(items)
    n_turns = sum(len(it.get("conversations", [it])) for it in items)
    seen_history = []

    def right(image_path, prompt, history, english):
        seen_history.append(len(history))
        assert Path(image_path).is_file() and isinstance(english, bool)
        return truth[(image_path, prompt)][2]

    def wrong(image_path, prompt, history, english):
        qtype, answer, _ = truth[(image_path, prompt)]
        return _wrong_answer(qtype, answer)

    def only_chinese(image_path, prompt, history, english):
        return wrong(image_path, prompt, history, english) if english else right(image_path, prompt, history, english)

    def only_colour(image_path, prompt, history, english):
        qtype = truth[(image_path, prompt)][0]
        return right(image_path, prompt, history, english) if qtype == "colour" else "I don't know."

    res = ev.evaluate(items, right)
    assert res["overall"]["all"] == {"correct": n_turns, "total": n_turns, "accuracy": 1.0}
    assert set(res["rows"]) == set(QUESTION_TYPES) | {"multi_turn"}
    assert max(seen_history) >= 1  # multi-turn items pass the earlier turns as history
    assert ev.evaluate(items, wrong)["overall"]["all"]["accuracy"] == 0.0
    assert all(r["all"]["accuracy"] == 0.0 for r in ev.evaluate(items, wrong)["rows"].values())

    res = ev.evaluate(items, only_chinese)
    n_zh = sum(len(it.get("conversations", [it])) for it in items if it["lang"] == "zh")
    assert res["overall"]["zh"]["accuracy"] == 1.0 and res["overall"]["en"]["accuracy"] == 0.0
    assert res["overall"]["all"]["correct"] == n_zh
    assert res["overall"]["all"]["accuracy"] == pytest.approx(n_zh / n_turns)

    res = ev.evaluate(items, only_colour)
    n_colour = sum(1 for r in res["records"] if r["type"] == "colour")
    assert res["overall"]["all"]["correct"] == n_colour
    assert res["rows"]["colour"]["all"]["accuracy"] == 1.0
    assert res["rows"]["count"]["all"]["accuracy"] == 0.0
    table = ev.format_table(res)
    assert "colour" in table and "overall" in table and "100.0%" in table


def test_evaluate_cli_oracle(tmp_path):
    ev = _load_evaluate_module()
    out = tmp_path / "res.json"
    res = ev.main(["--oracle", "--generate", "20", "--seed", "8", "--include_background",
                   "--out_dir", str(tmp_path / "gen"), "--json", str(out)])
    assert res["overall"]["all"]["accuracy"] == 1.0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["overall"]["all"]["accuracy"] == 1.0
    res = ev.main(["--oracle", "--split", str(tmp_path / "gen"), "--types", "count"])
    assert set(res["rows"]) == {"count"}


def test_evaluate_cli_asks_the_held_out_rewordings(tmp_path):
    ev = _load_evaluate_module()
    res = ev.main(["--oracle", "--generate", "40", "--seed", "8", "--wording", "rewordings",
                   "--out_dir", str(tmp_path / "gen")])
    assert res["overall"]["all"]["accuracy"] == 1.0 and "absent" in res["rows"]
    held_out = {t for by_lang in REWORDINGS.values() for ts in by_lang.values() for t in ts}
    for record in res["records"]:       # every question is a filled-in rewording
        assert any(_fills(t, record["prompt"]) for t in held_out), record


def run_evaluate(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_evaluate_shows_progress_on_stderr_and_only_the_table_on_stdout(tmp_path, ckpt_dir):
    done = run_evaluate("--from_pretrained", str(ckpt_dir), "--device", "cpu", "--generate", "3", "--seed", "1",
                        "--max_length", "120", "--out_dir", str(tmp_path / "gen"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["type", "zh", "en", "all"] and lines[-1].startswith("overall"), done.stdout
    assert "Evaluating" not in done.stdout and "\r" not in done.stdout and "Setting accelerator" not in done.stdout
    n_turns = sum(len(it.get("conversations", [it])) for it in load_split(tmp_path / "gen"))
    assert "Generating images: 100%|" in done.stderr and "3/3" in done.stderr
    assert "Evaluating: 100%|" in done.stderr and f"{n_turns}/{n_turns}" in done.stderr


def test_evaluate_verbose_lines_go_to_stdout_beside_the_bar(tmp_path):
    done = run_evaluate("--oracle", "--generate", "2", "--seed", "4", "--out_dir", str(tmp_path / "gen"), "--verbose")
    assert done.returncode == 0 and done.stdout.count("[ok ]") >= 2 and "[ok ]" not in done.stderr


def test_evaluate_errors_are_one_line_not_a_traceback(tmp_path):
    missing = run_evaluate("--from_pretrained", str(tmp_path / "no-model"), "--generate", "2",
                           "--out_dir", str(tmp_path / "gen"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[-1].startswith(f"error: Checkpoint '{tmp_path / 'no-model'}' not found")
    no_split = run_evaluate("--oracle", "--split", str(tmp_path / "no-split"))
    assert no_split.returncode == 1 and "Traceback" not in no_split.stderr
    assert no_split.stderr.startswith(f"error: cannot read the split {tmp_path / 'no-split'}")


# ----------------------------------------------------------------------------- fewshot-data.zip

def _zip_contents(path):
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_shipped_fewshot_zip_is_valid():
    path = REPO / "fewshot-data.zip"
    assert path.is_file() and path.stat().st_size < 1_000_000
    files = _zip_contents(path)
    images = sorted(n for n in files if n.endswith(".png"))
    assert len(images) == 20 and all(n.startswith(FEWSHOT_DIRNAME + "/") for n in files)
    items = json.loads(files[f"{FEWSHOT_DIRNAME}/dataset.json"].decode("utf-8"))
    assert len(items) == 80 and sorted(set(it["img"] for it in items)) == images
    background = [it for it in items if it["type"] == "background"]
    rehearsal = [it for it in items if it["type"] != "background"]
    # every image: the background question in both languages, a description and one other known type
    for img in images:
        mine = [it for it in items if it["img"] == img]
        assert sorted((it["type"], it["lang"]) for it in mine if it["type"] == "background") == \
            [("background", "en"), ("background", "zh")]
        assert sorted(it["type"] == "describe" for it in mine) == [False, False, False, True]
    assert {it["type"] for it in rehearsal} <= set(PRETRAIN_TYPES) and len({it["type"] for it in rehearsal}) >= 4
    assert Counter(it["lang"] for it in rehearsal) == {"zh": 20, "en": 20}
    assert len({it["answer"]["background"] for it in background}) == len(BACKGROUND_COLOURS)
    for item in items:
        assert item["prompt"] in TEMPLATES[item["type"]][item["lang"]] or item["type"] != "background"
        pixels = _pixels(files[item["img"]])
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        if item["type"] == "background":
            corners = {tuple(pixels[y, x]) for y in (0, IMAGE_SIZE - 1) for x in (0, IMAGE_SIZE - 1)}
            assert corners == {BACKGROUND_COLOURS[item["answer"]["background"]]}
        assert grade(item, None, item["label"], item["lang"])


def test_fewshot_zip_equals_fresh_rebuild(tmp_path):
    shipped = _zip_contents(REPO / "fewshot-data.zip")
    rebuilt_path = write_fewshot_zip(tmp_path / "fewshot-data.zip")
    rebuilt = _zip_contents(rebuilt_path)
    assert sorted(shipped) == sorted(rebuilt)
    for name in shipped:
        if name.endswith(".png"):
            assert np.array_equal(_pixels(shipped[name]), _pixels(rebuilt[name])), name
        else:
            assert shipped[name] == rebuilt[name], name
    # the zip itself is reproducible byte for byte (fixed order, timestamps and attributes)
    again = write_fewshot_zip(tmp_path / "again.zip")
    assert again.read_bytes() == rebuilt_path.read_bytes()
    assert build_fewshot_files(seed=1) != build_fewshot_files()


def test_evaluate_cli_with_tiny_checkpoint(tmp_path, ckpt_dir):
    """The CLI's answer_fn goes through model.sat.loading + model.chat (a tiny random model: ~0%)."""
    ev = _load_evaluate_module()
    res = ev.main(["--from_pretrained", str(ckpt_dir), "--device", "cpu", "--generate", "4", "--seed", "1",
                   "--multi_turn_fraction", "0.5", "--max_length", "160", "--out_dir", str(tmp_path / "gen"),
                   "--json", str(tmp_path / "res.json")])
    n_turns = sum(len(it.get("conversations", [it])) for it in load_split(tmp_path / "gen"))
    assert res["overall"]["all"]["total"] == n_turns
    assert all(isinstance(r["response"], str) for r in res["records"])
    assert json.loads((tmp_path / "res.json").read_text(encoding="utf-8"))["overall"]["all"]["total"] == n_turns
