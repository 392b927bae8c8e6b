"""Fine-tuning survives being killed: kill -9 during training and during a checkpoint save, and a full disk
during a save, on the bundled visualglm-tiny (CPU, DeepSpeed over gloo). A run folder must only ever show
complete iterations, `latest` must name one, and --load must continue from it.

Killed runs are subprocesses started through tests/pausing_finetune.py, which can stop torch.save half-way
through a file so that the kill lands inside a save deterministically; the resumed runs are in process."""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune_visualglm as ft
from model.sat.checkpoint import load_model
from test_finetune_data import make_dataset

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "tests" / "pausing_finetune.py"
BUNDLED = ROOT / "pretrained" / "visualglm-tiny"
MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), 4)


def argv(data, *extra, iters=1000):
    """Short CPU runs: LoRA on one layer, micro-batch 1, ZeRO 1 (an optimizer file per save)."""
    return ["--from_pretrained", str(BUNDLED), "--train-data", str(data), "--train-iters", str(iters),
            "--batch-size", "1", "--max_source_length", "64", "--max_target_length", "16", "--num-workers", "0",
            "--log-interval", "1", "--seed", "3", "--use_lora", "--layer_range", "0", "--zero-stage", "1",
            "--resume-dataloader", "--save-interval", "3", *extra]


def start(args, tmp_path, pause_match=None, pause_skip=0):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if pause_match:
        env.update(PAUSE_SAVE_MATCH=pause_match, PAUSE_SAVE_SKIP=str(pause_skip),
                   PAUSE_SAVE_FLAG=str(tmp_path / "paused"))
    log = open(tmp_path / "killed-run.log", "w")
    return subprocess.Popen([sys.executable, str(SHIM), *args], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for(condition, proc, tmp_path, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value or proc.poll() is not None:
            return value
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out:\n" + (tmp_path / "killed-run.log").read_text()[-3000:])


def kill9(proc):
    proc.kill()   # SIGKILL: no cleanup of any kind runs
    proc.wait()


def the_run(save: Path) -> Path:
    (run,) = save.iterdir()
    return run


def latest(run: Path) -> str:
    return (run / "latest").read_text().strip()


def logged_iterations(run: Path):
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if line.endswith("}") and '"loss"' in line]


def iteration_folders(run: Path):
    return sorted((p.name for p in run.iterdir() if p.name.isdigit()), key=int)


def assert_all_complete(run: Path):
    """Every iteration folder in place loads in full: the model file (weights only) and the optimizer state."""
    for name in iteration_folders(run):
        torch.load(run / name / MODEL_FILE, weights_only=True)
        states = list((run / name / "deepspeed").iterdir())
        assert len(states) == 2, states
        for f in states:
            torch.load(f, weights_only=False)


def test_kill_during_training_resumes_from_the_last_complete_checkpoint(data, tmp_path, capsys):
    save = tmp_path / "runs"
    proc = start(argv(data, "--save", str(save)), tmp_path)

    def training_past_a_save():   # a save has finished and the next one is iterations away
        runs = list(save.glob("*/latest")) if save.exists() else []
        return runs and logged_iterations(runs[0].parent)[-1:] > [int(latest(runs[0].parent))]
    try:
        assert wait_for(training_past_a_save, proc, tmp_path), (tmp_path / "killed-run.log").read_text()[-3000:]
    finally:
        kill9(proc)
    run = the_run(save)
    saved = int(latest(run))
    assert logged_iterations(run)[-1] > saved
    assert_all_complete(run)

    result = ft.run(argv(data, "--load", str(run), "--exit-interval", str(saved + 2)))
    assert f"resuming {run} at iteration {saved}" in capsys.readouterr().out
    assert result.run_dir == run and result.iteration == saved + 2 and latest(run) == str(saved + 2)
    # the log reads as one run: the iterations the kill threw away are not mixed in with their repeats
    assert logged_iterations(run) == list(range(1, saved + 3))
    assert_all_complete(run)
    assert type(load_model(str(run))).__name__ == "FineTuneVisualGLMModel"


def test_kill_during_a_checkpoint_save_keeps_the_previous_checkpoint_in_use(data, tmp_path, capsys):
    from model.sat.merge_lora import main as merge_main
    save = tmp_path / "runs"
    # the second save (iteration 6) stops half-way through DeepSpeed's optimizer file
    proc = start(argv(data, "--save", str(save)), tmp_path, pause_match="optim_states", pause_skip=1)
    try:
        assert wait_for((tmp_path / "paused").exists, proc, tmp_path), \
            (tmp_path / "killed-run.log").read_text()[-3000:]
    finally:
        kill9(proc)
    run = the_run(save)
    # nothing half-written is in place; what load_model and the merge tool read is iteration 3
    assert latest(run) == "3" and iteration_folders(run) == ["3"]
    assert_all_complete(run)
    assert merge_main(["--from", str(run), "--to", str(tmp_path / "merged")]) == 0

    result = ft.run(argv(data, "--load", str(run), "--exit-interval", "8"))
    out = capsys.readouterr().out
    assert f"resuming {run} at iteration 3" in out
    assert "left by an interrupted save" in out                  # the leftover is cleaned, with a log line
    assert result.iteration == 8 and latest(run) == "8" and iteration_folders(run) == ["3", "6", "8"]
    assert_all_complete(run)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_relaunching_with_a_reached_exit_interval_does_not_rewrite_the_checkpoint(data, tmp_path, monkeypatch):
    """Relaunching the same slice (--exit-interval already reached) must not write over the checkpoint it
    loaded: a kill during that write would destroy the only complete one."""
    run = ft.run(argv(data, "--save", str(tmp_path / "runs"), "--exit-interval", "3")).run_dir
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train_log.jsonl"}
    real_save, writes = torch.save, []
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: (writes.append(f), real_save(obj, f, *a, **kw)))
    result = ft.run(argv(data, "--load", str(run), "--exit-interval", "3"))
    assert result.iteration == 3 and writes == []
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train_log.jsonl"} == before


def full_disk_on(monkeypatch, failing, nth=2):
    """torch.save fails with ENOSPC, after writing a few bytes, on the nth file `failing` accepts."""
    real_save, seen = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and failing(Path(f)):
            seen.append(f)
            if len(seen) == nth:
                Path(f).write_bytes(b"PK\x03\x04")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("failing", ["optimizer", "model"])
def test_disk_full_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
        failing, data, tmp_path, monkeypatch, capsys):
    full_disk_on(monkeypatch, (lambda p: "optim_states" in p.name) if failing == "optimizer" else
                 (lambda p: p.name == MODEL_FILE and p.parent.name != "deepspeed"))
    save = tmp_path / "runs"
    assert ft.main(argv(data, "--save", str(save), "--save-interval", "2", iters=4)) == 1
    run = the_run(save)
    err = capsys.readouterr().err
    assert f"not enough disk space to save the checkpoint to {run / '4'}" in err, err
    assert "No space left on device" in err and "the previous checkpoint 2 is intact" in err, err
    assert latest(run) == "2" and iteration_folders(run) == ["2"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]   # the partial save is gone
    assert_all_complete(run)
    assert type(load_model(str(run))).__name__ == "FineTuneVisualGLMModel"

    if failing == "model":
        return
    monkeypatch.undo()   # room on the disk again: the run resumes from iteration 2
    result = ft.run(argv(data, "--load", str(run), "--save-interval", "2", iters=4))
    assert f"resuming {run} at iteration 2" in capsys.readouterr().out
    assert result.iteration == 4 and latest(run) == "4"


def test_save_checkpoint_on_a_full_disk_keeps_the_existing_folder(tiny_config, tmp_path, monkeypatch):
    from model.sat.checkpoint import CheckpointError, build_model, save_checkpoint
    out = save_checkpoint(build_model(tiny_config, device="cpu"), tmp_path / "model")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    full_disk_on(monkeypatch, lambda p: p.name == MODEL_FILE, nth=1)
    with pytest.raises(CheckpointError, match=f"not enough disk space to save the checkpoint to {out}"):
        save_checkpoint(build_model(tiny_config, device="cpu"), out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]     # no temporary folder left behind
