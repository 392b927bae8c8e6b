"""infer.py --ray: the same job through Ray Data on a local Ray instance with 2 model actors gives the
same records as the single-machine path, and resumes the same way. Skipped when Ray is not installed
(pip install -r requirements_ray.txt; CI installs it)."""
import json

import pytest

pytest.importorskip("ray.data")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # Ray's own, from its DataContext

import infer  # noqa: E402

from test_infer import QUESTIONS, answers, write_jsonl  # noqa: E402


def records(path):
    """Each record without its timing, by id."""
    return {r["id"]: {k: v for k, v in r.items() if k != "seconds"} for r in answers(path)}


def test_ray_with_two_workers_gives_the_single_machine_records(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)      # a new local instance, never someone's cluster
    from PIL import Image
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    Image.new("RGB", (64, 48), "blue").save(tmp_path / "blue.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 48), "green").save(tmp_path / "sub" / "green.jpg")
    rows = QUESTIONS + ["{broken", {"id": "gone", "text": "Describe the image.", "image": "gone.png"}]
    src = write_jsonl(tmp_path / "q.jsonl", rows)
    common = ["--from_pretrained", str(ckpt_dir), "--device", "cpu", "--input", str(src), "--top_k", "1",
              "--max_length", "100", "--batch_size", "2", "--window_batches", "1"]
    alone, on_ray = tmp_path / "alone.jsonl", tmp_path / "ray.jsonl"
    assert infer.main(common + ["--output", str(alone)]) == 0
    # a partial output first: the Ray run answers only the rest
    first = [line for line in alone.read_text(encoding="utf-8").splitlines()][:3]
    on_ray.write_text("\n".join(first) + "\n", encoding="utf-8")
    assert infer.main(common + ["--output", str(on_ray), "--ray", "--ray_workers", "2", "--ray_cpus", "0.5"]) == 0
    got = answers(on_ray)
    assert [json.dumps(r) for r in got[:3]] == [json.dumps(json.loads(x)) for x in first]
    assert sorted(r["id"] for r in got) == sorted(records(alone))           # each id exactly once
    assert records(on_ray) == records(alone)
    assert "error" in records(on_ray)["gone"] and "error" in records(on_ray)["line-9"]
