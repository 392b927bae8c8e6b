"""Run folders on disk: naming and opening them, saving an iteration all or nothing, and finding
(and restoring) the newest complete iteration after a kill or a full disk for --load.

A run folder only ever shows complete iterations: <run>/<n>/ is written as <run>/.saving-<n>/, gets a
complete.json listing its files (written last), is synced and renamed into place, and only then does
`latest` name it. An older folder of the same number is set aside as .replaced-<n> while it is replaced.
"""
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from model.defaults import TOKENIZER_FILES

from .console import log
from .distributed import Dist, any_rank
from .rng import rng_state, set_rng_state

LOG_FILE = "train_log.jsonl"
MODEL_FILE = "mp_rank_00_model_states.pt"
COMPLETE_MARKER = "complete.json"
SAVING_PREFIX = ".saving-"
REPLACED_PREFIX = ".replaced-"
OLD_STAGING_PREFIXES = (".staging-", "..staging-")   # what older versions of this script left on a crash


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------------
# which iterations are complete

def read_latest(run_dir: Path) -> Optional[int]:
    try:
        text = (run_dir / "latest").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_complete_marker(folder: Path, iteration: int) -> None:
    files = {f.relative_to(folder).as_posix(): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / COMPLETE_MARKER).write_text(json.dumps({"iteration": iteration, "files": files}, indent=1))


def is_complete(folder: Path) -> bool:
    """The folder has its complete.json and every file it lists, at the size it lists."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        return all((folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_iterations(run_dir: Path) -> List[int]:
    """Iterations of a run that are safe to load, oldest first. A folder without complete.json counts
    only when `latest` names it and it has its model file: older versions wrote `latest` last."""
    latest = read_latest(run_dir)
    found = []
    for folder in run_dir.iterdir() if run_dir.is_dir() else ():
        if folder.name.isdigit() and folder.is_dir():
            legacy = (int(folder.name) == latest and not (folder / COMPLETE_MARKER).exists()
                      and (folder / MODEL_FILE).is_file())
            if legacy or is_complete(folder):
                found.append(int(folder.name))
    return sorted(found)


def previous_checkpoint(run_dir: Path) -> str:
    done = complete_iterations(run_dir)
    if not done:
        return "no earlier checkpoint of this run is complete"
    return f"the previous checkpoint {done[-1]} is intact ({run_dir / str(done[-1])})"


# ----------------------------------------------------------------------------------------------
# recovering after an interrupted save

def clean_leftovers(run_dir: Path) -> None:
    """Undo what an interrupted save left in a run folder (rank 0, before resuming): an iteration that
    was set aside and never replaced is put back; half-written folders and temporary files go."""
    for path in sorted(run_dir.iterdir()):
        name = path.name
        if name.startswith(REPLACED_PREFIX):
            target = run_dir / name[len(REPLACED_PREFIX):]
            if target.name.isdigit() and not target.exists() and is_complete(path):
                os.replace(path, target)
                log(f"restored {target}: a save replacing it was interrupted")
                continue
        if name.startswith((SAVING_PREFIX, REPLACED_PREFIX) + OLD_STAGING_PREFIXES) or \
                (name.startswith(".") and name.endswith(".tmp")):
            _remove(path)
            log(f"removed {path}: left by an interrupted save")


def recover_run_folder(run_dir: Path, dist: Dist) -> int:
    """Prepare a run folder for --load: clean leftovers, make `latest` name the newest complete
    iteration (so that load_model and the merge tools read the same one) and return it on every rank."""
    from model.sat.checkpoint import CheckpointError, atomic_write_text
    if dist.rank == 0:
        clean_leftovers(run_dir)
        done = complete_iterations(run_dir)
        for folder in sorted(run_dir.iterdir()):
            if folder.name.isdigit() and folder.is_dir() and int(folder.name) > (done[-1] if done else -1):
                log(f"ignoring {folder}: incomplete (its save was interrupted)")
        if done and read_latest(run_dir) != done[-1]:
            log(f"{run_dir / 'latest'} named {read_latest(run_dir)}; the newest complete iteration is {done[-1]}")
            atomic_write_text(run_dir / "latest", str(done[-1]))
    torch.distributed.barrier()
    done = complete_iterations(run_dir)
    if not done:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to resume from (was it killed before its "
                              f"first save finished?)")
    return done[-1]


def trim_train_log(run_dir: Path, iteration: int) -> None:
    """A resumed run repeats the iterations after its checkpoint: move their records, and a line cut
    short by a kill, to train_log.discarded.jsonl so that train_log.jsonl reads as one run."""
    from model.sat.checkpoint import atomic_write_text
    path = run_dir / LOG_FILE
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
            done = line.endswith("\n") and int(record.get("iteration", 0)) <= iteration
        except (ValueError, TypeError, AttributeError):
            done = False
        (keep if done else drop).append(line if line.endswith("\n") else line + "\n")
    if drop:
        with open(run_dir / "train_log.discarded.jsonl", "a", encoding="utf-8") as f:
            f.writelines(drop)
        atomic_write_text(path, "".join(keep))
        log(f"moved {len(drop)} record(s) of {LOG_FILE} after iteration {iteration} to train_log.discarded.jsonl")


# ----------------------------------------------------------------------------------------------
# starting or resuming a run

def start_run(args, engine, dist: Dist, tokenizer_dir: Path, resume_from: Optional[Path],
              saved_iteration: Optional[int]) -> Tuple[Optional[Path], int, int]:
    """(run folder or None without --save and --load, iteration, micro-batch) to continue from; with
    --load, `resume_from` is the run and `saved_iteration` its newest complete iteration."""
    iteration, micro_step, run_dir = 0, 0, None
    if args.load:  # sat: runs resume in their own folder (under --save when given)
        run_dir = Path(args.save) / resume_from.resolve().name if args.save else resume_from
        iteration, micro_step = load_training_state(engine, resume_from, saved_iteration, args)
    elif args.save:
        run_dir = new_run_dir(args, dist)
    if run_dir is not None and dist.rank == 0:
        open_run_folder(run_dir, tokenizer_dir, iteration if args.load else None)
    return run_dir, iteration, micro_step


def new_run_dir(args, dist: Dist) -> Path:
    """<save>/<experiment-name>-<month-day-hour-minute>, named by rank 0 for every rank."""
    run_dir = None
    if dist.rank == 0:
        stamp = datetime.datetime.now().strftime("%m-%d-%H-%M")
        run_dir = base = Path(args.save) / f"{args.experiment_name}-{stamp}"
        n = 1
        while run_dir.exists() and any(run_dir.iterdir()):  # two runs started in the same minute
            run_dir, n = Path(f"{base}-{n}"), n + 1
    names = [str(run_dir)]
    torch.distributed.broadcast_object_list(names, src=0)
    return Path(names[0])


def load_training_state(engine, run: Path, saved_iteration: int, args) -> Tuple[int, int]:
    """Optimizer state, iteration, data position (--resume-dataloader) and RNG state of a saved
    iteration, into `engine` (whose weights load_model already read). Returns (iteration, micro_step)."""
    iteration, micro_step = saved_iteration, 0
    ds_dir = run / str(saved_iteration)
    if (ds_dir / "deepspeed").is_dir():
        _, client = engine.load_checkpoint(str(ds_dir), tag="deepspeed", load_module_strict=False,
                                           load_lr_scheduler_states=False)
        client = client or {}
        iteration = int(client.get("iteration", iteration))
        if args.resume_dataloader:
            micro_step = int(client.get("micro_step", 0))
        if "rng" in client and not args.no_load_rng:
            set_rng_state(client["rng"])
    else:
        log(f"warning: {ds_dir} has no deepspeed/ optimizer state; the optimizer starts fresh")
    log(f"resuming {run} at iteration {iteration}")
    return iteration, micro_step


def open_run_folder(run_dir: Path, tokenizer_dir: Path, resume_iteration: Optional[int]) -> None:
    """Rank 0: create the run folder with its tokenizer; when resuming, make it consistent first."""
    from model.sat.checkpoint import atomic_copy
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_iteration is not None:
        clean_leftovers(run_dir)
        trim_train_log(run_dir, resume_iteration)
    for f in TOKENIZER_FILES:   # copied under a temporary name: a kill must not leave a truncated tokenizer
        if (tokenizer_dir / f).is_file() and not (run_dir / f).exists():
            atomic_copy(tokenizer_dir / f, run_dir / f)
    log(f"run folder: {run_dir}")


# ----------------------------------------------------------------------------------------------
# saving an iteration

def write_model_files(module, folder: Path, mp_rank: int = 0) -> None:
    """<folder>/mp_rank_XX_model_states.pt in sat format (weights-only loadable): the whole model, or
    model-parallel rank XX's part of it."""
    from model.sat.checkpoint import write_model_state
    write_model_state(module, folder / f"mp_rank_{mp_rank:02d}_model_states.pt")


def publish_iteration(run_dir: Path, staging: Path, iteration: int, config: dict) -> None:
    """Rank 0: turn a fully written staging folder into <run>/<iteration> and name it in `latest`."""
    from model.sat.checkpoint import atomic_write_text, fsync_path, fsync_tree
    write_complete_marker(staging, iteration)
    fsync_tree(staging)
    atomic_write_text(run_dir / "model_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    target, aside = run_dir / str(iteration), run_dir / f"{REPLACED_PREFIX}{iteration}"
    if target.exists():   # half-written by an older version, or saved by an earlier attempt of this run
        _remove(aside)
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_path(run_dir)
    atomic_write_text(run_dir / "latest", str(iteration))
    _remove(aside)


def save_iteration(engine, run_dir: Path, iteration: int, config: dict, dist: Dist, args, micro_step: int):
    """<run>/<iteration>/ with the model file(s) and deepspeed/ (optimizer state, for --load), all or
    nothing: a kill at any moment leaves `latest` naming a complete iteration. Running out of disk
    raises CheckpointSaveError and leaves the previous checkpoint as it was."""
    from model.sat.checkpoint import save_error
    client = {"iteration": iteration, "micro_step": micro_step}
    if not args.no_save_rng:
        client["rng"] = rng_state()
    config = dict(config, model_class=type(engine.module).__name__)
    staging = run_dir / f"{SAVING_PREFIX}{iteration}"
    if dist.rank == 0:
        _remove(staging)   # from an earlier attempt at this iteration
    torch.distributed.barrier()
    failure = None
    try:   # every rank writes its optimizer partition; DeepSpeed's files stay out of the model file
        engine.save_checkpoint(str(staging), tag="deepspeed", client_state=client,
                               save_latest=False, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:   # RuntimeError: torch's zip writer reporting a failed write
        failure = e
    failed = any_rank(failure is not None, dist.device)
    if not failed and dist.dp_rank == 0:   # one model file per model-parallel rank, as sat writes them
        try:
            write_model_files(engine.module, staging, dist.mp_rank)
        except (OSError, RuntimeError) as e:
            failure = e
    failed = failed or any_rank(failure is not None, dist.device)   # every part written before publishing
    if not failed and dist.rank == 0:
        try:
            publish_iteration(run_dir, staging, iteration, config)
        except (OSError, RuntimeError) as e:
            failure = e
    if any_rank(failure is not None, dist.device):   # all ranks stop together instead of waiting forever
        if dist.rank == 0:
            _remove(staging)
        error = failure or RuntimeError("another process could not write its part")
        raise save_error(error, run_dir / str(iteration), previous_checkpoint(run_dir)) from failure
    log(f"saved iteration {iteration} to {run_dir}")
