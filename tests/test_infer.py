"""Offline batch inference (infer.py, offline/): batched answers equal one-at-a-time answers, resume
after a crash or Ctrl-C, error records for bad lines, folder input, and the output file's safety."""
import json

import pytest
import torch
from PIL import Image, ImageDraw

import infer
from conftest import default_sigint
from model.chat import ChatEngine
from model.sampling import SamplingParams
from offline.inputs import read_inputs
from offline.outputs import OutputFile
from offline.runner import Runner, RunError, Settings

GREEDY = dict(max_length=120, top_p=0.4, top_k=1, temperature=0.8, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok = tiny
    return ChatEngine(model, tok)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    (folder / "sub").mkdir()
    for name, colour, shape in [("red.png", "red", "ellipse"), ("blue.png", "blue", "rectangle"),
                                ("sub/green.jpg", "green", "ellipse")]:
        img = Image.new("RGB", (224, 224), "white")
        getattr(ImageDraw.Draw(img), shape)([50, 50, 170, 170], fill=colour)
        img.save(folder / name)
    return folder


# Mixed prompt lengths, with and without images, Chinese and English, multi-turn
QUESTIONS = [
    {"id": "zh-img", "text": "描述这张图片。", "image": "red.png"},
    {"id": "en-img", "text": "What colour is the background?", "image": "blue.png"},
    {"id": "en-long", "text": "Is there a star? " * 6 + "How many shapes are there?", "image": "sub/green.jpg"},
    {"id": "zh-text", "text": "你好，请问你是谁？"},
    {"id": "en-text", "prompt": "Hello, who are you?"},
    {"id": "zh-multi", "text": "有两个形状。", "image": "red.png", "history": [["图片里有几个形状？", "有两个形状。"]]},
    {"id": "en-forced", "text": "图中有一个红色的圆形。", "english": True},
    {"id": 8, "text": "Describe the image.", "image": "blue.png"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def answers(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def by_id(records):
    return {r["id"]: r for r in records}


def run_records(engine, path, batch_size, window_batches=2, **settings):
    out = []
    runner = Runner(engine, Settings(**dict(GREEDY, **settings)), batch_size=batch_size, window_batches=window_batches)
    runner.process(read_inputs(path), out.extend)
    return by_id(out)


@pytest.fixture(scope="module")
def one_at_a_time(engine, pictures):
    """Each question of QUESTIONS answered alone by the terminal chat's engine on the sat backend:
    {id: (english, response)}."""
    out = {}
    for q in QUESTIONS:
        text = q.get("text", q.get("prompt"))
        english = q.get("english", not any("\u4e00" <= c <= "\u9fff" for c in text))
        image = str(pictures / q["image"]) if "image" in q else None
        response, _, _ = engine.chat(image, text, history=q.get("history"), english=english,
                                     params=SamplingParams(**GREEDY))
        out[str(q["id"])] = english, response
    return out


def test_batched_greedy_answers_equal_one_at_a_time_answers(engine, pictures, monkeypatch, one_at_a_time):
    sizes = []
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda requests, **kw: (sizes.append(len(requests)), real(requests, **kw))[1])
    batched = run_records(engine, write_jsonl(pictures / "q.jsonl", QUESTIONS), batch_size=3)
    assert max(sizes) == 3 and len(sizes) < len(QUESTIONS)          # several questions per forward pass
    assert set(batched) == {str(q["id"]) for q in QUESTIONS}
    for rid, (english, alone) in one_at_a_time.items():
        got = batched[rid]
        assert "error" not in got, got
        assert got["response"] == alone, rid
        assert got["english"] == english and got["settings"]["top_k"] == 1
        assert got["prompt_tokens"] > 0 and got["completion_tokens"] > 0
    assert len({r["response"] for r in batched.values()}) > 3                # the answers do differ


def test_continuous_batching_on_the_fast_backend_gives_the_one_at_a_time_answers(tiny, engine, pictures, monkeypatch,
                                                                                  one_at_a_time):
    """--batching continuous (the fast backend's slots: answers leave, the next lines join between steps)
    against the sat backend's answers one at a time."""
    from model import continuous
    model, tok = tiny
    fast = ChatEngine(model, tok, backend="fast")
    steps, admitted = [], []
    real_admit, real_step = continuous.ContinuousBatch.admit, continuous.ContinuousBatch.step
    monkeypatch.setattr(continuous.ContinuousBatch, "admit",
                        lambda self, rs: (admitted.append(len(rs)), real_admit(self, rs))[1])
    monkeypatch.setattr(continuous.ContinuousBatch, "step", lambda self: (steps.append(len(self.running)), real_step(self))[1])
    path = write_jsonl(pictures / "c.jsonl", QUESTIONS)
    out = []
    Runner(fast, Settings(**GREEDY), batch_size=3, batching="continuous").process(read_inputs(path), out.extend)
    got = by_id(out)
    assert max(steps) == 3 and len(admitted) > 1 and sum(admitted) == len(QUESTIONS)   # joined while others ran
    for rid, (english, alone) in one_at_a_time.items():
        assert got[rid]["response"] == alone and got[rid]["english"] == english, rid
        assert got[rid]["finish_reason"] in ("stop", "length")
    with pytest.raises(RunError, match="fast backend"):
        Runner(engine, Settings(**GREEDY), batching="continuous").process(iter([]), out.extend)


def test_seeded_sampling_does_not_depend_on_the_batch(engine, pictures):
    path = write_jsonl(pictures / "s.jsonl", QUESTIONS[:5])
    sampled = dict(GREEDY, top_k=0, top_p=1.0, temperature=1.5, seed=3)
    one = run_records(engine, path, batch_size=1, **sampled)
    many = run_records(engine, path, batch_size=5, window_batches=1, **sampled)
    assert {k: r["response"] for k, r in one.items()} == {k: r["response"] for k, r in many.items()}
    other = run_records(engine, path, batch_size=5, window_batches=1, **dict(sampled, seed=4))
    assert {k: r["response"] for k, r in other.items()} != {k: r["response"] for k, r in one.items()}


def cli(ckpt_dir, input_path, output, *extra):
    return infer.main(["--from_pretrained", str(ckpt_dir), "--device", "cpu", "--input", str(input_path),
                       "--output", str(output), "--top_k", "1", "--max_length", "120", "--batch_size", "2",
                       "--window_batches", "1", *extra])


def test_resume_after_ctrl_c_and_a_torn_line_answers_only_the_rest(ckpt_dir, pictures, tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "q.jsonl", [dict(q, image=str(pictures / q["image"])) if "image" in q else q
                                             for q in QUESTIONS])
    full = tmp_path / "full.jsonl"
    assert cli(ckpt_dir, src, full) == 0
    reference = by_id(answers(full))

    # Ctrl-C during the third batch: the first two batches are on disk, nothing of the third
    out = tmp_path / "out.jsonl"
    real, batches = Runner.run_batch, []

    def interrupted(self, batch):
        batches.append([x.record.id for x in batch])
        if len(batches) == 3:
            raise KeyboardInterrupt
        return real(self, batch)
    monkeypatch.setattr(Runner, "run_batch", interrupted)
    assert cli(ckpt_dir, src, out) == 130
    kept = answers(out)
    assert sorted(r["id"] for r in kept) == sorted(batches[0] + batches[1])
    # ... and a crash in the middle of a write leaves half a line
    before = out.read_bytes()
    out.write_bytes(before + b'{"id": "' + batches[2][0].encode() + b'", "respon')

    monkeypatch.setattr(Runner, "run_batch", real)
    answered = []
    monkeypatch.setattr(Runner, "prepare", lambda self, r, _p=Runner.prepare: (answered.append(r.id), _p(self, r))[1])
    capsys.readouterr()
    assert cli(ckpt_dir, src, out) == 0
    assert "skipped 4" in capsys.readouterr().out
    assert sorted(answered) == sorted(set(reference) - set(batches[0] + batches[1]))   # only the rest
    final = answers(out)
    assert out.read_bytes().startswith(before)                              # complete lines never touched
    assert sorted(r["id"] for r in final) == sorted(reference)              # each id exactly once
    assert {r["id"]: r["response"] for r in final} == {k: r["response"] for k, r in reference.items()}

    assert cli(ckpt_dir, src, out) == 0 and answers(out) == final           # nothing left: nothing written


def test_bad_lines_become_error_records_and_the_run_goes_on(ckpt_dir, pictures, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    rows = [
        {"id": "ok-1", "text": "描述这张图片。", "image": str(pictures / "red.png")},
        {"id": "missing", "text": "Describe the image.", "image": "nowhere.png"},
        "{this is not json",
        {"id": "unreadable", "text": "Describe the image.", "image": "notes.png"},
        {"id": "too-long", "text": "Is there a star? " * 80},
        {"id": "no-text", "image": "notes.png"},
        {"id": "bad-history", "text": "hi", "history": "nope"},
        "[1, 2]",
        {"id": "ok-2", "text": "Hello, who are you?"},
    ]
    out = tmp_path / "out.jsonl"
    assert cli(ckpt_dir, write_jsonl(tmp_path / "q.jsonl", rows), out) == 0
    got = by_id(answers(out))
    assert set(got) == {"ok-1", "missing", "line-3", "unreadable", "too-long", "no-text", "bad-history", "line-8", "ok-2"}
    assert "response" in got["ok-1"] and "response" in got["ok-2"]
    errors = {k: r["error"] for k, r in got.items() if "error" in r}
    assert set(errors) == set(got) - {"ok-1", "ok-2"}
    assert "not found" in errors["missing"] and "not valid JSON" in errors["line-3"]
    assert "not a PNG" in errors["unreadable"] or "readable image" in errors["unreadable"]
    assert "max_length=120" in errors["too-long"] and "'text'" in errors["no-text"]
    assert "history" in errors["bad-history"] and "JSON object" in errors["line-8"]
    assert "done 2, failed 7" in capsys.readouterr().out


def test_a_folder_of_images_with_one_prompt(ckpt_dir, pictures, tmp_path, engine):
    out = tmp_path / "out.jsonl"
    assert cli(ckpt_dir, pictures, out, "--prompt", "Describe the image.") == 0
    got = by_id(answers(out))
    assert set(got) == {"red.png", "blue.png", "sub/green.jpg"}
    assert all(r["text"] == "Describe the image." and r["english"] for r in got.values())


def test_the_output_is_appended_to_never_rewritten(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "old", "response": "kept"}\nnot a record\n{"id": "last", "response": "no newline"}')
    warnings = []
    output = OutputFile(out, warnings.append)
    assert output.done_ids() == {"old", "last"}                    # a whole last record only lacked its newline
    output.write([{"id": "new", "response": "x"}])
    output.close()
    assert out.read_bytes().startswith(b'{"id": "old", "response": "kept"}\nnot a record\n{"id": "last"')
    assert [json.loads(x)["id"] for x in out.read_text().splitlines() if x.startswith("{")] == ["old", "last", "new"]
    assert any("not output records" in w for w in warnings)


def test_user_errors_are_messages_not_tracebacks(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "q.jsonl", [{"id": 1, "text": "hi"}])
    assert infer.main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "No such input file or folder" in capsys.readouterr().err
    assert infer.main(["--input", str(src), "--output", str(src)]) == 2
    assert "--output is the input file" in capsys.readouterr().err
    assert infer.main(["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--top_p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert infer.main(["--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                       "--from_pretrained", str(tmp_path / "no-model")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o.jsonl").exists()
    # --ray without Ray installed says how to install it
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    assert infer.main(["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--ray"]) == 1
    assert "requirements_ray.txt" in capsys.readouterr().err


def test_a_real_ctrl_c_keeps_every_finished_line(ckpt_dir, tmp_path):
    """SIGINT to a running infer.py (as Ctrl-C in a terminal sends): status 130, only whole lines."""
    import os
    import signal
    import subprocess
    import sys
    import time
    src = write_jsonl(tmp_path / "q.jsonl", [{"id": i, "text": f"Is there a star? {i}"} for i in range(400)])
    out = tmp_path / "out.jsonl"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "infer.py"), "--from_pretrained", str(ckpt_dir),
                             "--device", "cpu", "--input", str(src), "--output", str(out), "--top_k", "1",
                             "--max_length", "120", "--batch_size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)      # generous: CI machines can be slow
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert 0 < len(lines) < 400 and out.read_text(encoding="utf-8").endswith("\n")
    assert all("response" in json.loads(line) for line in lines)
    assert f"done {len(lines)}," in stdout
