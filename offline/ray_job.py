"""The batch job on a Ray cluster (infer.py --ray): Ray Data map_batches over a pool of model actors.

    driver (infer.py):  reads the input and the ids already in the output (the same rules as on one
                        machine), makes a Dataset of the records still to answer, one JSON string each
    actors (Predictor): each loads the model once (one per GPU with --device cuda, or one per CPU
                        worker) and answers blocks of records with the single-machine Runner: the same
                        loader threads, length buckets, batches and error records
    driver:             iterates the answers as actors finish them and appends them to the one output
                        file (offline/outputs.py): resume, flushing and the summary work as without Ray

Every node must see the repository, the checkpoint and the images at the same paths (a shared
filesystem, or the same copies everywhere); the driver passes absolute paths and the repository's
folder as PYTHONPATH. Ray itself is optional: it is imported only here.
"""
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Dict, List

from .inputs import Record
from .runner import ModelError, OnDone, RunError, build_runner

REPO = str(Path(__file__).resolve().parent.parent)
INSTALL_HINT = "pip install -r requirements_ray.txt"


class RayError(RunError):
    pass


class Predictor:
    """One Ray actor: one model. Called with a block of records, returns their output records."""

    def __init__(self, options: dict):
        self.runner = build_runner(options)

    def __call__(self, batch: Dict[str, "object"]) -> Dict[str, "object"]:
        import numpy as np
        out: List[dict] = []
        self.runner.process((Record.from_json(text) for text in batch["record"]), out.extend)
        return {"line": np.array([json.dumps(r, ensure_ascii=False) for r in out], dtype=object)}


def run_on_ray(address: str, options: dict, records: List[Record], on_done: OnDone, workers: int = 2,
               cpus: float = 1.0, gpus=None) -> None:
    """address: "local" (a new Ray instance on this machine), "auto" (the cluster this machine is part
    of) or a ray:// address. on_done(output records) as blocks come back, in the order they finish."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    options = _portable(options)
    if gpus is None:
        gpus = 1.0 if str(options.get("device") or "").startswith("cuda") else 0.0
    window = options["batch_size"] * options["window_batches"]
    env = {"PYTHONPATH": REPO, **{k: os.environ[k] for k in ("SAT_HOME", "HF_HOME") if k in os.environ}}
    local = dict(num_cpus=max(os.cpu_count() or 1, math.ceil(workers * cpus))) if address == "local" else {}
    try:   # (a local instance gets at least the CPUs the actors reserve, so that they all start)
        ray.init(address=None if address == "local" else address, runtime_env={"env_vars": env},
                 log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING, **local)
    except Exception as e:  # noqa: BLE001 - no cluster at that address, a version mismatch...
        raise RayError(f"could not start or join Ray at {address!r}: {type(e).__name__}: {e}") from None
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False    # infer.py shows its own
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        blocks = max(1, math.ceil(len(records) / window))
        ds = ray.data.from_items([{"record": r.to_json()} for r in records], override_num_blocks=blocks)
        ds = ds.map_batches(Predictor, fn_constructor_kwargs={"options": options}, batch_size=window,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus, num_gpus=gpus)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            on_done([json.loads(line) for line in batch["line"]])
    except ray.exceptions.RayError as e:
        raise RayError(f"the Ray job failed: {_root_message(e)}") from None
    finally:
        ray.shutdown()


def _portable(options: dict) -> dict:
    """Paths the actors must open, made absolute (an actor's working folder is not the driver's). A
    checkpoint that cannot be found fails here, before any actor starts."""
    from model.sat.checkpoint import CheckpointError, resolve_checkpoint_dir
    out = dict(options)
    try:
        out["from_pretrained"] = str(resolve_checkpoint_dir(out["from_pretrained"], download=False).resolve())
    except CheckpointError as e:
        raise ModelError(str(e)) from None
    tokenizer = out.get("tokenizer")
    if tokenizer and Path(tokenizer).expanduser().exists():
        out["tokenizer"] = str(Path(tokenizer).expanduser().resolve())
    return out


def _root_message(e: BaseException) -> str:
    """The last line of the innermost error that has a message: for an actor that failed to start,
    Ray's message ends with the exception the actor raised ("ModelError: ...")."""
    text, seen = "", set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
        text = lines[-1] if lines else text or type(e).__name__
        e = getattr(e, "cause", None) or e.__cause__
    return text
