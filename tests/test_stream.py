"""synthetic/stream.py: the on-the-fly training source (`--train-data synthetic:<samples>[:<seed>]`)."""
import numpy as np
import pytest

from synthetic.grading import grade
from synthetic.qa import PRETRAIN_TYPES
from synthetic.scenes import BACKGROUND_COLOURS
from synthetic.stream import generated_entry, parse_spec


@pytest.mark.parametrize("spec, expected", [("synthetic:10", (10, 1)), ("synthetic:2000000:7", (2000000, 7)),
                                            ("synthetic:5:0", (5, 0))])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["synthetic:", "synthetic:0", "synthetic:-3", "synthetic:ten", "synthetic:5:x",
                                  "synthetic:5:1:2", "shapes:5"])
def test_parse_spec_rejects_malformed_specs_with_the_expected_form(spec):
    with pytest.raises(ValueError, match=r"expected synthetic:<samples>\[:<seed>\]"):
        parse_spec(spec)


def test_a_sample_depends_only_on_its_index_and_seed():
    forward = [generated_entry(i, 3) for i in range(12)]
    backward = [generated_entry(i, 3) for i in reversed(range(12))][::-1]
    for (e1, im1), (e2, im2) in zip(forward, backward):
        assert e1 == e2 and np.array_equal(np.asarray(im1), np.asarray(im2))
    # different indices and seeds give different scenes
    images = {np.asarray(im).tobytes() for _, im in forward} | {np.asarray(generated_entry(i, 4)[1]).tobytes()
                                                                 for i in range(12)}
    assert len(images) == 24


def test_samples_mix_the_pretraining_types_and_answer_their_questions():
    types, langs, multi = set(), set(), 0
    for i in range(300):
        entry, image = generated_entry(i, 1)
        assert entry["img"] is None and image.size == (224, 224)
        turns = entry.get("conversations", [entry])
        multi += "conversations" in entry
        for turn in turns:
            types.add(turn["type"])
            # each label answers its own question (graded as a model response would be)
            assert grade(turn, None, turn["label"], entry["lang"]), turn
        langs.add(entry["lang"])
        # the image's corner is the background colour: every scene is drawn, not a blank
        assert tuple(np.asarray(image)[0, 0]) in {tuple(c) for c in BACKGROUND_COLOURS.values()}
    assert types == set(PRETRAIN_TYPES) and "background" not in types     # the few-shot task stays held out
    assert langs == {"en", "zh"} and 30 < multi < 100                        # about 20% conversations
