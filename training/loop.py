"""The training loop: iterations of accumulated micro-batches at the scheduled learning rate, log lines
and train_log.jsonl, validation and checkpoints at their intervals, and the final save and evaluations."""
import datetime
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from .batches import BatchOrder, make_loader
from .console import log
from .distributed import Dist, all_mean
from .objective import forward_loss, learning_rate
from .runs import LOG_FILE, save_iteration, start_run
from .session import Session, open_session


@dataclass
class TrainResult:
    model: torch.nn.Module
    run_dir: Optional[Path]
    iteration: int
    losses: List[float] = field(default_factory=list)       # per iteration (mean over micro-batches)
    valid_losses: List[tuple] = field(default_factory=list)  # (iteration, loss)
    trainable: int = 0


def train(args) -> TrainResult:
    """Train as the parsed flags say: set up, start or resume the run, iterate, save, evaluate."""
    session = open_session(args)
    resume_from = session.source.path if args.load else None
    run_dir, iteration, micro_step = start_run(args, session.engine, session.dist, session.tokenizer_dir,
                                               resume_from, session.source.iteration)
    result = TrainResult(model=session.engine.module, run_dir=run_dir, iteration=iteration,
                         trainable=session.trainable)
    stop = min(args.train_iters, args.exit_interval or args.train_iters)
    if iteration >= stop:   # saving now would only rewrite the checkpoint just loaded
        limit = "--train-iters" if stop == args.train_iters else "--exit-interval"
        log(f"nothing to do: iteration {iteration} >= {limit} {stop}")
        return result
    _Loop(session, result, run_dir, micro_step, stop).run()
    result.model = session.engine.module
    return result


@torch.no_grad()
def evaluate(engine, dataset, args, dist: Dist, pad_id: int) -> float:
    """Mean loss over up to --eval-iters batches of `dataset`, averaged over the processes."""
    order = BatchOrder(len(dataset), args.eval_batch_size, dist.dp_world, dist.dp_rank, args.seed, shuffle=False)
    steps = min(args.eval_iters, max(1, math.ceil(len(dataset) / (args.eval_batch_size * dist.dp_world))))
    engine.eval()
    losses = [forward_loss(engine, batch, dist.device).item()
              for batch in make_loader(dataset, order, 0, steps, pad_id, 0)]
    engine.train()
    return all_mean(sum(losses) / len(losses), dist.device)


def _fmt_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


class _Loop:
    """Iterations from result.iteration to `stop`. The position (iteration, micro-batch) is what a
    checkpoint saves; micro-batches come from the batch order at that position."""

    def __init__(self, session: Session, result: TrainResult, run_dir: Optional[Path], micro_step: int, stop: int):
        self.session, self.args, self.dist, self.engine = session, session.args, session.dist, session.engine
        self.result, self.run_dir, self.stop = result, run_dir, stop
        self.iteration, self.micro_step = result.iteration, micro_step
        self.lr: Optional[float] = None   # of the last step, for its log line
        args = self.args
        order = BatchOrder(len(session.train_set), args.batch_size, self.dist.dp_world, self.dist.dp_rank, args.seed)
        last = micro_step + (stop - self.iteration) * args.gradient_accumulation_steps
        self.loader = iter(make_loader(session.train_set, order, micro_step, last,
                                       session.tokenizer.pad_token_id, args.num_workers))
        self.log_file = None   # train_log.jsonl: written by rank 0 of a run that saves
        self.start_time, self.start_iteration = time.time(), self.iteration
        self.window_losses, self.window_start, self.window_iters = [], time.time(), 0

    def run(self) -> None:
        if self.run_dir is not None and self.dist.rank == 0:
            self.log_file = open(self.run_dir / LOG_FILE, "a", encoding="utf-8")
        try:
            while self.iteration < self.stop:
                self.step()
                self.after_step()
            self.finish()
        finally:
            if self.log_file:
                self.log_file.close()
        self.result.iteration = self.iteration

    def step(self) -> None:
        """One optimizer step over --gradient-accumulation-steps micro-batches."""
        self.lr = learning_rate(self.args, self.iteration)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr
        step_losses = []
        for _ in range(self.args.gradient_accumulation_steps):
            loss = forward_loss(self.engine, next(self.loader), self.dist.device)
            self.engine.backward(loss)
            self.engine.step()
            step_losses.append(loss.item())
            self.micro_step += 1
        self.iteration += 1
        self.result.losses.append(sum(step_losses) / len(step_losses))
        self.window_losses.append(self.result.losses[-1])
        self.window_iters += 1

    def after_step(self) -> None:
        """Log, validate and save on their intervals (the last iteration always logs; finish() saves it)."""
        args, iteration = self.args, self.iteration
        if iteration % args.log_interval == 0 or iteration == self.stop:
            self.report()
        if self.session.valid_set is not None and args.eval_interval and iteration % args.eval_interval == 0:
            valid = self.evaluate(self.session.valid_set)
            self.result.valid_losses.append((iteration, valid))
            log(f"validation loss at iteration {iteration}: {valid:.4f} (perplexity {math.exp(min(valid, 50)):.2f})")
            self.write_record({"iteration": iteration, "valid_loss": valid})
        if self.run_dir is not None and iteration % args.save_interval == 0 and iteration != self.stop:
            self.save()

    def report(self) -> None:
        """The log line and train_log.jsonl record of the iterations since the last one."""
        iteration, now = self.iteration, time.time()
        mean_loss = all_mean(sum(self.window_losses) / len(self.window_losses), self.dist.device)
        per_iter = (now - self.start_time) / (iteration - self.start_iteration)
        record = {"iteration": iteration, "loss": mean_loss, "lr": self.lr,
                  "samples_per_s": self.window_iters * self.session.global_batch / max(now - self.window_start, 1e-9),
                  "elapsed_s": now - self.start_time, "eta_s": per_iter * (self.stop - iteration)}
        memory = ""
        if self.args.fp16:
            record["skipped_steps"] = int(getattr(self.engine, "skipped_steps", 0))
        if self.dist.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2 ** 30
            memory = f" | max memory {record['max_memory_gib']:.1f} GiB"
        log(f"iteration {iteration:>6}/{self.args.train_iters} | loss {mean_loss:.4f} | lr {self.lr:.3e} | "
            f"{record['samples_per_s']:.2f} samples/s | elapsed {_fmt_time(record['elapsed_s'])} | "
            f"ETA {_fmt_time(record['eta_s'])}{memory}")
        self.write_record(record)
        self.window_losses, self.window_start, self.window_iters = [], time.time(), 0

    def write_record(self, record: dict) -> None:
        if self.log_file:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()   # a killed run keeps its records up to here

    def evaluate(self, dataset) -> float:
        return evaluate(self.engine, dataset, self.args, self.dist, self.session.tokenizer.pad_token_id)

    def save(self) -> None:
        save_iteration(self.engine, self.run_dir, self.iteration, self.session.config, self.dist, self.args,
                       self.micro_step)

    def finish(self) -> None:
        """Save the last iteration; validate unless it just did; the test loss when there is a test set."""
        if self.run_dir is not None:
            self.save()
        validated = self.args.eval_interval and self.iteration % self.args.eval_interval == 0
        if self.session.valid_set is not None and not validated:
            valid = self.evaluate(self.session.valid_set)
            self.result.valid_losses.append((self.iteration, valid))
            log(f"validation loss at the end (iteration {self.iteration}): {valid:.4f}")
        if self.session.test_set is not None:
            log(f"test loss at the end: {self.evaluate(self.session.test_set):.4f}")
