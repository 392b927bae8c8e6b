"""The model in its own process: ProcessWorker, a drop-in for serving.worker.Worker in the HTTP API.

Why: in one process the model thread and the event loop (uvicorn, SSE, detokenizing, JSON) share one GIL,
and torch gives it up around every op, so each decode step waits for the event loop again and again.
Measured on an H200 at 64 streams: 24 ms per decode step behind the server against 11 ms without it.
Here the model runs in a child process with an ordinary Worker, and the server's Python never competes
with it.

    parent (HTTP)                                         child (model)
    prepare(): tokenize, resize the image (uint8)         Worker(loader=...): load, batch, decode
    submit(job)   --- ("submit", id, request, pixels) -->  worker.enqueue(job)
    stream.cancel() --- ("cancel", id) ---------------->  worker.cancel(job)
    (commands go through a sender thread, in order: the event loop never waits for the pipe; pixels travel
    as a NumPy array)
    reader thread <-- ("items", [(id, ids | Finished)]) -- one message per step (the Worker's _flush)
                  <-- ("stats", {queued, running, ...}) -- every STATS_INTERVAL when something changed

The parent keeps the tokenizer and the model's shape (a ChatEngine without weights), so prepare(),
decode() and their errors (PromptTooLongError...) are the same as in-process. It admits at most
max_queue + slots unfinished requests (QueueFullError beyond). If the child dies, every unfinished request
ends with a GenerationError and the state turns "failed" with the reason (GET /health says it).
Messages are plain pickles (torch's multiprocessing reductions would move tensors through shared memory).
"""
import asyncio
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
import weakref
from types import SimpleNamespace
from typing import Callable, Dict, Optional

import torch

from .errors import GenerationError, NotReadyError, QueueFullError, ServingError
from .worker import Finished, Job, Stream, Worker, _deliver, prepare_job, quick_gil_handoffs

log = logging.getLogger("visualglm.serving")

STATS_INTERVAL = 0.1             # seconds between the child's reports of its queue and counters
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _send(conn, lock: threading.Lock, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(data)


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


# -- the child ------------------------------------------------------------------------------------------
class _PipeLoop:
    """Stands in for the consumers' event loop inside the child. The Worker hands items over with
    loop.call_soon_threadsafe(_deliver, items) (once per step) or (job.queue.put_nowait, item): the
    callback runs at once, every item it puts into an _Outlet is collected, and they go to the parent
    as one message."""

    def __init__(self, conn, lock: threading.Lock, jobs: dict):
        self._conn, self._lock, self._jobs = conn, lock, jobs
        self._items = None

    def call_soon_threadsafe(self, callback, *args) -> None:
        with self._lock:
            self._items = []
            callback(*args)
            items, self._items = self._items, None
            for job_id, item in items:
                if isinstance(item, Finished):
                    self._jobs.pop(job_id, None)
            try:
                data = pickle.dumps(("items", items), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001 - an error that does not pickle travels as its text
                items = [(i, Finished(x.reason, GenerationError(str(x.error))) if isinstance(x, Finished) and x.error
                          else x) for i, x in items]
                data = pickle.dumps(("items", items), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                self._conn.send_bytes(data)
            except (OSError, EOFError):
                pass                             # the parent is gone: the command loop ends the child


class _Outlet:
    """A job's queue inside the child: what is put into it joins the message being collected."""

    def __init__(self, loop: _PipeLoop, job_id: int):
        self.loop, self.id = loop, job_id

    def put_nowait(self, item) -> None:
        self.loop._items.append((self.id, item))


class _StepTimes:
    """The child's stand-in for ServingMetrics: it keeps the step phases and the queue waits for the
    parent (which counts tokens and outcomes itself, from the messages it receives)."""

    def __init__(self):
        self._events, self._lock = [], threading.Lock()

    def step(self, phase: str, seconds: float) -> None:
        with self._lock:
            self._events.append(("step", (phase, seconds)))

    def admitted(self, waited: float, handoff) -> None:
        with self._lock:
            self._events.append(("admitted", (waited, handoff)))

    def take(self) -> list:
        """[(ServingMetrics method, its arguments)] since the last take."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def token(self, count: int = 1) -> None:
        pass

    def observe(self, outcome: str, job=None) -> None:
        pass


def _describe(worker: Worker) -> dict:
    """What the parent needs to prepare requests and answer /health: the tokenizer and the model's shape."""
    engine = worker.engine
    slots = worker.slots
    return dict(tokenizer=engine.tokenizer, image_size=engine.backend.image_size, image_length=engine.image_length,
                max_context=engine.max_context, allow_image_paths=engine.allow_image_paths,
                allow_image_urls=engine.allow_image_urls, slots_total=worker.slots_total,
                slots=None if slots is None else (slots.slots, slots.length))


def _child_main(loader: Callable, options: dict, commands, events, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the whole process group: the parent decides
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    lock, jobs = threading.Lock(), {}
    loop = _PipeLoop(events, lock, jobs)
    worker = Worker(loader=loader, **options)
    worker.metrics = observed = _StepTimes()
    worker.start()
    if not worker.wait_ready():
        _send(events, lock, ("failed", worker.error))
        return
    _send(events, lock, ("ready", _describe(worker)))
    last, due = None, 0.0
    while True:
        if time.monotonic() >= due:                 # on time even while commands keep coming
            due = time.monotonic() + STATS_INTERVAL
            report, taken = dict(queued=worker.queued, running=worker.running, stats=worker.stats), observed.take()
            if report != last or taken:
                last = report
                _send(events, lock, ("stats", dict(report, observed=taken)))
        if not commands.poll(max(0.0, due - time.monotonic())):
            continue
        try:
            message = _recv(commands)
        except (EOFError, OSError):
            break                                    # the parent is gone
        kind = message[0]
        if kind == "submit":
            _, job_id, request, pixels, key, submitted_at = message
            job = Job(request, torch.from_numpy(pixels) if pixels is not None else None, key)
            job.submitted_at = submitted_at          # the parent's: time.monotonic() is one clock for both
            job.loop, job.queue = loop, _Outlet(loop, job_id)
            jobs[job_id] = job
            try:
                worker.enqueue(job)
            except ServingError as e:                # not expected: the parent admits within the child's limit
                loop.call_soon_threadsafe(job.queue.put_nowait, Finished("error", e))
        elif kind == "cancel":
            job = jobs.get(message[1])
            if job is not None:
                worker.cancel(job)
        elif kind == "stop":
            break
    worker.stop()


# -- the parent -----------------------------------------------------------------------------------------
class _ModelShape:
    """The parent's backend: the sizes tokenizing and preprocessing need, no weights (they are in the child)."""
    device = torch.device("cpu")

    def __init__(self, image_size, image_length: int, max_sequence_length: int):
        self.image_size, self.image_length, self.max_sequence_length = image_size, image_length, max_sequence_length

    def encode_image(self, *args, **kwargs):
        raise RuntimeError("the model runs in the engine process")

    prefill = decode_step = encode_image


def _end_process(process) -> None:
    if process.is_alive():
        process.kill()
        process.join(5)


def _exit_reason(code: Optional[int]) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class ProcessWorker:
    """Worker's interface (start, wait_ready, stop, prepare, submit, cancel, state, stats...) over a
    Worker running in a child process. loader: a picklable callable returning a ChatEngine (a module-level
    function or a functools.partial of one: it is called in the child)."""

    def __init__(self, loader: Callable, *, max_batch: int = 8, max_queue: int = 32, batch_wait: float = 0.01,
                 continuous: Optional[bool] = None, gpu_memory_fraction: float = 0.9):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._loader = loader
        self.max_batch, self.max_queue = max_batch, max_queue
        # the child's own queue limit never bites: this side admits at most max_queue + slots unfinished jobs
        self._options = dict(max_batch=max_batch, max_queue=max_queue + max_batch, batch_wait=batch_wait,
                             continuous=continuous, gpu_memory_fraction=gpu_memory_fraction)
        self.engine = None                       # the parent's ChatEngine (tokenizer, shape), once ready
        self.slots = None                        # the child's slots (.slots, .length); None: static batching
        self.metrics = None                      # serving.metrics.ServingMetrics, if the app attached one
        self.state, self.error = "loading", None
        self.messages = 0                        # item messages received (one per step, continuous batching)
        self._slots_total = max_batch
        self._report = dict(queued=0, running=0, stats={})
        self._rejected = 0
        self._jobs: Dict[int, Job] = {}          # id(job) -> unfinished job
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._outbox: "queue.SimpleQueue" = queue.SimpleQueue()   # commands for the sender thread
        self._settled = threading.Event()
        self._stopping = False
        self._process = self._commands = self._events = None

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> "ProcessWorker":
        with self._lock:
            if self._process is not None:
                return self
            ctx = multiprocessing.get_context("spawn")          # CUDA cannot fork
            commands_in, self._commands = ctx.Pipe(duplex=False)
            self._events, events_out = ctx.Pipe(duplex=False)
            # not a daemon: torch.compile may start worker processes of its own in the child
            self._process = ctx.Process(target=_child_main, name="visualglm-engine",
                                        args=(self._loader, self._options, commands_in, events_out,
                                              logging.getLogger().getEffectiveLevel()))
            self._process.start()
            commands_in.close()                  # the child holds these now: its death closes the pipe
            events_out.close()
            weakref.finalize(self, _end_process, self._process)
            threading.Thread(target=self._read, name="visualglm-engine-reader", daemon=True).start()
            threading.Thread(target=self._send_commands, name="visualglm-engine-sender", daemon=True).start()
            quick_gil_handoffs()
        return self

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        self._settled.wait(timeout)
        return self.state == "ready"

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        process = self._process
        if process is not None:
            self._outbox.put(("stop",))          # after every command queued before it
            process.join(timeout)
            _end_process(process)
            self._commands.close()
        self._fail_all(NotReadyError("The server is shutting down."))
        if self.state != "failed":
            self.state = "stopped"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def queued(self) -> int:
        return self._report["queued"]

    @property
    def running(self) -> int:
        return self._report["running"]

    @property
    def slots_total(self) -> int:
        return self._slots_total

    @property
    def max_context(self) -> int:
        return self.require_ready().max_context

    @property
    def stats(self) -> dict:
        """The child's counters (as Worker.stats), with the requests refused here."""
        return {**self._report["stats"], "rejected": self._rejected}

    def require_ready(self):
        if self.state == "loading":
            raise NotReadyError("The model is still loading; try again shortly (GET /health says when it is ready).")
        if self.state == "failed":
            what = "The model process failed" if self.engine is not None else "The model failed to load"
            raise NotReadyError(f"{what}: {self.error}")
        if self.state == "stopped" or self._stopping:
            raise NotReadyError("The server is shutting down.")
        return self.engine

    # -- front-end side ---------------------------------------------------------------------------------
    def prepare(self, query: str, history, image=None, english: bool = False, params=None, generator=None) -> Job:
        """As Worker.prepare, on this side (the child only runs the model)."""
        return prepare_job(self.require_ready(), query, history, image, english, params, generator)

    def submit(self, job: Job) -> Stream:
        job.loop = asyncio.get_running_loop()
        job.queue = asyncio.Queue()
        with self._lock:
            self.require_ready()
            if len(self._jobs) >= self.max_queue + self._slots_total:
                self._rejected += 1
                if self.metrics is not None:
                    self.metrics.observe("rejected")
                raise QueueFullError(f"The server is busy: {self.queued} requests are already waiting. "
                                     f"Try again shortly.")
            job.state = "queued"
            job.submitted_at = time.monotonic()
            self._jobs[id(job)] = job
            # pixels as a NumPy array: torch's own pickling of a tensor took ~100 us here and ~70 us to load
            pixels = job.pixels.numpy() if job.pixels is not None else None
            self._outbox.put(("submit", id(job), job.request, pixels, job.image_key, job.submitted_at))
        job.pixels = None                        # the message holds them
        return Stream(self, job)

    def cancel(self, job: Job) -> None:
        with self._lock:
            unfinished = self._jobs.get(id(job)) is job and not job.cancelled.is_set()
            job.cancelled.set()
            if unfinished:
                self._outbox.put(("cancel", id(job)))

    # -- the sender thread ------------------------------------------------------------------------------
    def _send_commands(self) -> None:
        """Pickle and send the queued commands in order, off the event loop and outside the job lock: a
        request's pixels fill the pipe, and a write blocks until the child reads, which held up the event
        loop (and, through the job lock, the reader thread) while a burst of requests came in. If the
        child is gone, the reader fails the unfinished jobs and commands are dropped."""
        while True:
            message = self._outbox.get()
            try:
                _send(self._commands, self._send_lock, message)
            except (OSError, ValueError):
                pass
            if message[0] == "stop":
                return

    # -- the reader thread ------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = _recv(self._events)
            except (EOFError, OSError):
                break
            try:
                self._handle(*message)
            except Exception:  # noqa: BLE001 - the reader must go on, or every stream would hang
                log.exception("handling a message of the model process failed")
        self._process.join(5)
        if not self._stopping and self.state != "failed":
            self.error = f"the model process ended unexpectedly ({_exit_reason(self._process.exitcode)})"
            self.state = "failed"
            log.error("%s; the server answers 503 until it is restarted", self.error)
        self._settled.set()
        if self._stopping:
            self._fail_all(NotReadyError("The server is shutting down."))
        else:
            self._fail_all(GenerationError(f"Generation failed: {self.error}"))

    def _handle(self, kind: str, body) -> None:
        if kind == "items":
            self.messages += 1
            self._receive(body)
        elif kind == "stats":
            self._report = body
            if self.metrics is not None:
                for method, args in body["observed"]:
                    if method in ("step", "admitted"):          # what _StepTimes records
                        getattr(self.metrics, method)(*args)
        elif kind == "ready":
            self._become_ready(body)
        elif kind == "failed":
            self.error, self.state = body, "failed"
            self._settled.set()

    def _become_ready(self, info: dict) -> None:
        from model.chat import ChatEngine
        shape = _ModelShape(info["image_size"], info["image_length"], info["max_context"])
        self.engine = ChatEngine(shape, info["tokenizer"], allow_image_paths=info["allow_image_paths"],
                                 allow_image_urls=info["allow_image_urls"])
        if info["slots"] is not None:
            self.slots = SimpleNamespace(slots=info["slots"][0], length=info["slots"][1])
        self._slots_total = info["slots_total"]
        if self.state == "loading":
            self.state = "ready"
        self._settled.set()
        log.info("model loaded in process %d; serving", self._process.pid)

    def _receive(self, items) -> None:
        """Count one message's tokens and endings here (job and metrics), then hand them to the consumers."""
        by_loop: dict = {}
        now = time.monotonic()
        for job_id, item in items:
            job = self._jobs.get(job_id)
            if job is None:
                continue
            if isinstance(item, Finished):
                with self._lock:
                    self._jobs.pop(job_id, None)
                self._record_end(job, item)
            else:
                job.generated += len(item)
                if job.first_token_at is None:
                    job.first_token_at = now
                if self.metrics is not None:
                    self.metrics.token(len(item))
            by_loop.setdefault(job.loop, []).append((job, item))
        self._hand_over(by_loop)

    def _record_end(self, job: Job, end: Finished) -> None:
        job.state, job.finish_reason, job.error = "done", end.reason, end.error
        if self.metrics is not None:
            self.metrics.observe(end.reason, job)

    def _hand_over(self, by_loop: dict) -> None:
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:                 # the consumer's event loop is closed: nobody listens
                for job, _ in items:
                    self.cancel(job)

    def _fail_all(self, error: Exception) -> None:
        """End every unfinished job with `error` (the child is gone or going)."""
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        by_loop: dict = {}
        for job in jobs:
            end = Finished("error", error)
            self._record_end(job, end)
            by_loop.setdefault(job.loop, []).append((job, end))
        self._hand_over(by_loop)


def engine_process_wanted(choice: str, device: Optional[str] = None) -> bool:
    """--engine-process: "on", "off", or "auto" = on when the model runs on CUDA (where the event loop
    was measured slowing the model thread down), off on the CPU."""
    if choice != "auto":
        return choice == "on"
    return torch.cuda.is_available() and not str(device or "cuda").startswith("cpu")
