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


def test_answers_held_out_rewordings():
    """Phrasings no training has seen (synthetic.qa.REWORDINGS), absent-shape questions among them: the
    model before its fifth training stage scored 55% here, the shipped one 81% on 1,000 images."""
    import evaluate
    results = evaluate.main(["--from_pretrained", "visualglm-tiny", "--generate", "60", "--seed", "2",
                             "--wording", "rewordings", "--device", "cpu"])
    assert results["overall"]["all"]["accuracy"] >= 0.7, results["overall"]
