"""The shipped pretrained/visualglm-tiny: resolvable by name offline, small, and really looking at images."""
from pathlib import Path

import pytest

from model.sat.checkpoint import BUNDLED_DIR, resolve_checkpoint_dir

TINY = BUNDLED_DIR / "visualglm-tiny"


def test_bundled_model_is_found_by_name_and_small(monkeypatch, tmp_path):
    monkeypatch.setenv("SAT_HOME", str(tmp_path))  # nothing in SAT_HOME: the bundled copy must be used
    assert resolve_checkpoint_dir("visualglm-tiny", download=False) == TINY
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert size <= 25 * 2**20


@pytest.fixture(scope="module")
def tiny_model():
    from model.sat.loading import load_model_and_tokenizer
    return load_model_and_tokenizer("visualglm-tiny", device="cpu")


def test_answers_held_out_questions_at_the_target():
    """Greedy answers on 60 held-out generated images (seed 2), every pretraining question type: the
    target is 95% on each type (README: 98-100% on 1,000 images); a model that ignored the image would
    score about a third."""
    import evaluate
    results = evaluate.main(["--from_pretrained", "visualglm-tiny", "--generate", "60", "--seed", "2",
                             "--device", "cpu"])
    rows = results["rows"]
    assert results["overall"]["all"]["accuracy"] >= 0.95, results["overall"]
    for qtype in ("describe", "colour", "shape", "count", "position", "exists"):
        assert rows[qtype]["all"]["accuracy"] >= 0.9, (qtype, rows[qtype])


def test_background_question_is_not_answered_before_fine_tuning():
    """The few-shot task is held out: before fine-tuning the model does not answer it (README: 0%)."""
    import evaluate
    results = evaluate.main(["--from_pretrained", "visualglm-tiny", "--generate", "20", "--seed", "3",
                             "--types", "background", "--include_background", "--device", "cpu"])
    assert results["rows"]["background"]["all"]["accuracy"] <= 0.2


def test_same_question_different_images_different_answers(tiny_model, tmp_path):
    import random
    from model.chat import chat
    from synthetic.scenes import sample_scene
    model, tok = tiny_model
    rng = random.Random(11)
    answers = set()
    for i in range(6):
        path = tmp_path / f"{i}.png"
        sample_scene(rng).render().save(path)
        answers.add(chat(str(path), model, tok, "How many shapes are there?", english=True, top_k=1,
                         max_length=120)[0])
    assert len(answers) >= 2, answers


@pytest.mark.parametrize("wording", ["rewordings", "rewordings2"])
def test_answers_held_out_rewordings(wording):
    """Phrasings no training has seen (the two held-out lists of synthetic.qa), absent-shape questions
    among them: the target is 90%; the model before its sixth training stage scored 76% and 88% here."""
    import evaluate
    results = evaluate.main(["--from_pretrained", "visualglm-tiny", "--generate", "60", "--seed", "2",
                             "--wording", wording, "--device", "cpu"])
    assert results["overall"]["all"]["accuracy"] >= 0.9, results["overall"]
