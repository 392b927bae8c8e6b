"""The model worker: one background thread owns the model and runs every generation.

Front ends (the HTTP API, the Gradio demo) never touch the model from their event loop. They call

    job = worker.prepare(query, history, image, english, params)   # any thread: tokenize, preprocess
    stream = worker.submit(job)                                     # on the event loop; may raise
    async for ids in stream: ...                                    # new token ids as they come
    stream.cancel()                                                 # client gone: stop this row

Two ways to batch, chosen by what the engine's backend can do:

- continuous (the fast backend, model/continuous.py): up to `max_batch` sequences decode together, one
  token each per step, in slots of preallocated key/value memory. Between steps, waiting requests are
  prefilled into free slots (their images encoded in one call) and decode with the others from the next
  step; a finished or cancelled request leaves its slot at once. Nobody waits for someone else's answer.
  Requests that came during an admission are admitted before the next step (for at most BURST_HOLD), so
  a burst is prefilled wave by wave as it arrives.
- static (the sat and Hugging Face backends): the thread takes up to `max_batch` waiting jobs (after
  waiting `batch_wait` seconds for more to arrive), encodes their images in one call, and runs them
  through one `generate()` call until its last row is done; requests arriving meanwhile wait for the
  next batch.
Either way each row keeps its own sampling settings and fails on its own: a row whose sampling raises
ends with a GenerationError while the others go on (only a failing forward pass fails the whole batch).
At most `max_queue` requests may wait beyond the free places; `submit` raises QueueFullError beyond that.

Tokens go back to each consumer's asyncio.Queue through loop.call_soon_threadsafe. A cancelled job
that is still waiting leaves the queue at once; a running one is dropped from the batch at the next
step (nothing more is sent), and the batch ends as soon as no row is left that someone waits for: a
batch whose last listeners left is closed right away instead of running on to its longest row.

The worker uses the chat engine (model.chat.ChatEngine) for everything model-related: `pixels(image)`
and `make_request(..., has_image=True)` to prepare, `encode_images(pixels, keys)` (batched, deduplicated,
cached) and `generate(requests, isolate_errors=True)` to run, `decode` and `max_context`. Whatever
backend the engine drives (sat, Hugging Face, a fast GPU path) serves the same way.

serving/engine_process.py runs this worker in a process of its own (api.py --engine-process, on by
default on a GPU), so that the event loop's Python never competes with the model thread for the GIL.
"""
import asyncio
import collections
import dataclasses
import logging
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch
from PIL import Image

from model.image import pixels_uint8
from model.image_cache import pixels_key
from model.sampling import SamplingParams

from .errors import GenerationError, ModelLoadError, NotReadyError, QueueFullError

log = logging.getLogger("visualglm.serving")

BURST_HOLD = 0.2      # seconds running rows may wait while a burst of arrivals is admitted first


@dataclasses.dataclass
class Finished:
    reason: str                                  # "stop", "length", "cancelled" or "error"
    error: Optional[Exception] = None


class Job:
    """One prepared request: its token ids and sampling settings, and its image pixels if any."""

    def __init__(self, request, pixels: Optional[torch.Tensor] = None, image_key: Optional[str] = None):
        self.request = request
        self.pixels = pixels
        self.image_key = image_key
        self.cancelled = threading.Event()
        self.state = "new"                       # new -> queued -> running -> done
        self.generated = 0
        self.finish_reason: Optional[str] = None
        self.error: Optional[Exception] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.queue: Optional[asyncio.Queue] = None
        self.submitted_at: Optional[float] = None      # time.monotonic() of submit, of the first token
        self.first_token_at: Optional[float] = None
        self.handoff: Optional[float] = None           # seconds from submit to the model process's queue

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.ids)


class Stream:
    """The consumer's side of a job: iterate for lists of new token ids; cancel() to stop."""

    def __init__(self, worker: "Worker", job: Job):
        self._worker = worker
        self.job = job

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        queue = self.job.queue
        while True:
            item = await queue.get()
            ids: List[int] = []
            while not isinstance(item, Finished):
                ids.extend(item)
                try:
                    item = queue.get_nowait()    # take whatever else is there in one go
                except asyncio.QueueEmpty:
                    item = None
                    break
            if ids:
                yield ids
            if isinstance(item, Finished):
                if item.error is not None:
                    raise item.error
                return

    def cancel(self) -> None:
        self._worker.cancel(self.job)

    @property
    def finish_reason(self) -> Optional[str]:
        return self.job.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self.job.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.job.generated


def prepare_job(engine, query: str, history, image=None, english: bool = False,
                params: Optional[SamplingParams] = None, generator: Optional[torch.Generator] = None) -> Job:
    """Worker.prepare's work on a given engine (the process worker prepares on its own side too)."""
    params = dataclasses.replace(params or SamplingParams())   # the job's own copy
    pixels = key = None
    if isinstance(image, Image.Image):    # resized bytes [1, 3, H, W]: normalised when encoded, on the device
        pixels = pixels_uint8(image, engine.backend.image_size)[None]
    elif image is not None:
        pixels = engine.pixels(image).float().cpu().contiguous()   # [1, 3, H, W]
    if pixels is not None:
        key = pixels_key(pixels)
    request = engine.make_request(query, list(history or []), None, english, params, generator,
                                  has_image=pixels is not None)
    return Job(request, pixels, key)


def quick_gil_handoffs() -> None:
    """Shorten Python's GIL switch interval (5 ms) to 50 us in this process. A serving process hands the
    GIL between threads all the time: in the model's, the event loop streams answers while the model
    thread gives the GIL up around every torch op (measured on an H200 at 64 streams: 40 ms per decode
    step at 0.5 ms, 24 ms at 50 us, against 11 ms with no server around); in the API's, the event loop,
    the image threads and the model process's pipe threads pass each request and token along."""
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.00005))


def _deliver(items) -> None:
    """On a consumer's event loop: hand each job its items, in order."""
    for job, item in items:
        job.queue.put_nowait(item)


class Worker:
    def __init__(self, engine=None, *, loader: Optional[Callable] = None, max_batch: int = 8,
                 max_queue: int = 32, batch_wait: float = 0.01, generate_fn: Optional[Callable] = None,
                 continuous: Optional[bool] = None, gpu_memory_fraction: float = 0.9):
        """engine: a ready ChatEngine; or loader: a callable returning one, run on the worker thread
        when it starts (the server answers /health with 503 meanwhile). continuous: None batches
        continuously when the backend can (the fast one), True requires it, False never does;
        gpu_memory_fraction: how much of the GPU's memory the process may fill with weights and the
        continuous batch's key/value slots (fewer than max_batch slots when that is too little)."""
        if (engine is None) == (loader is None):
            raise ValueError("pass either an engine or a loader")
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.engine = engine
        self._loader = loader
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self._generate_fn = generate_fn
        self.continuous = continuous
        self.gpu_memory_fraction = gpu_memory_fraction
        self.slots = None                        # the continuous batch's slot backend, once serving
        self._outbox: Optional[dict] = None      # continuous batching: what a step sends, per event loop
        self.metrics = None                      # serving.metrics.ServingMetrics, if the app attached one
        self.state = "ready" if engine is not None else "loading"   # loading, ready, failed, stopped
        self.error: Optional[str] = None
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._running: List[Job] = []
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._settled = threading.Event()        # loaded or failed
        if engine is not None:
            self._settled.set()
        self._stats = dict(requests=0, rejected=0, cancelled=0, batches=0, generate_calls=0, max_batch_seen=0,
                           tokens=0, errors=0, steps=0)
        self._free = max_batch                   # places a new request can start in without waiting

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> "Worker":
        """Start the worker thread (a given engine's key/value slots are allocated first, here)."""
        with self._cond:
            if self._thread is None:
                if self.engine is not None and self.slots is None:
                    self.slots = self._open_slots(self.engine)
                self._thread = threading.Thread(target=self._run, name="visualglm-worker", daemon=True)
                self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread is not None

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        self._settled.wait(timeout)
        return self.state == "ready"

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_pending(NotReadyError("The server is shutting down."))
        if self.state != "failed":
            self.state = "stopped"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def slots_total(self) -> int:
        """Sequences that can run at once (continuous: key/value slots; static: max_batch)."""
        return self.slots.slots if self.slots is not None else self.max_batch

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + answer) the model takes."""
        return self.require_ready().max_context

    @property
    def stats(self) -> dict:
        """Counters of the worker and of the engine's image encoder (images_encoded, image_cache_hits)."""
        images = getattr(getattr(self.engine, "images", None), "stats", {})
        return {**self._stats, **images}

    def require_ready(self):
        if self.state == "loading":
            raise NotReadyError("The model is still loading; try again shortly (GET /health says when it is ready).")
        if self.state == "failed":
            raise NotReadyError(f"The model failed to load: {self.error}")
        if self.state == "stopped" or self._stopping:
            raise NotReadyError("The server is shutting down.")
        return self.engine

    # -- front-end side -----------------------------------------------------------------------------
    def prepare(self, query: str, history, image=None, english: bool = False,
                params: Optional[SamplingParams] = None, generator: Optional[torch.Generator] = None) -> Job:
        """Tokenize and preprocess (CPU work; call it from a worker thread of the event loop, not the loop
        itself). image: a PIL image or pixels. Raises model.prompts.PromptTooLongError when the prompt
        does not fit within params.max_length. The image is encoded later, with the rest of its batch."""
        return prepare_job(self.require_ready(), query, history, image, english, params, generator)

    def submit(self, job: Job) -> Stream:
        """Queue a prepared job; call on the event loop that will consume the stream."""
        job.loop = asyncio.get_running_loop()
        job.queue = asyncio.Queue()
        self.enqueue(job)
        return Stream(self, job)

    def enqueue(self, job: Job) -> None:
        """submit() without the event loop: job.loop and job.queue are set already (the engine process's
        stand-ins, serving/engine_process.py). Raises QueueFullError when no place is left."""
        with self._cond:
            self.require_ready()
            limit = self.max_queue + self._free
            if len(self._pending) >= limit:
                self._stats["rejected"] += 1
                self._observe("rejected")
                raise QueueFullError(f"The server is busy: {len(self._pending)} requests are already waiting. "
                                     f"Try again shortly.")
            job.state = "queued"
            now = time.monotonic()
            if job.submitted_at is None:
                job.submitted_at = now
            else:                                # queued by the server first (serving/engine_process.py)
                job.handoff = now - job.submitted_at
            self._pending.append(job)
            self._stats["requests"] += 1
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        with self._cond:
            if job.state in ("done", "new"):
                job.cancelled.set()
                return
            if job.state == "queued":
                self._pending.remove(job)
                self._stats["cancelled"] += 1
                self._finish(job, "cancelled")
                return
            job.cancelled.set()      # running: the worker thread stops the row at its next step

    # -- worker thread ------------------------------------------------------------------------------
    def _run(self):
        if self._loader is not None and self.engine is None:
            try:
                engine = self._loader()
                slots = self._open_slots(engine)
            except ModelLoadError as e:   # explained by its message, which the front end prints
                error = str(e)
            except BaseException as e:  # noqa: BLE001 - report any failure through /health
                log.exception("loading the model failed")
                error = f"{type(e).__name__}: {e}"
            else:
                error = None
            if error is not None:
                with self._cond:
                    self.error = error
                    self.state = "failed"
                self._settled.set()
                return
            with self._cond:
                self.engine, self.slots = engine, slots
                if self.state == "loading":
                    self.state = "ready"
            self._settled.set()
            log.info("model loaded; serving")
        self._cache_an_image_per_conversation()
        if self.slots is not None:
            log.info("continuous batching: %d slots of %d tokens", self.slots.slots, self.slots.length)
            self._serve_continuous(self.slots)
        else:
            self._serve_static()

    def _cache_an_image_per_conversation(self) -> None:
        """Let the engine's image cache (IMAGE_CACHE_SIZE, sized for one user) hold an image for each
        conversation that can run at once and as many again waiting, so that the follow-ups of 64 ongoing
        conversations find theirs encoded (an entry is image_length x hidden: 256 KB for the released model
        in fp16)."""
        images = getattr(self.engine, "images", None)
        if images is not None:
            images.cache_size = max(images.cache_size, 2 * self.slots_total)

    def _open_slots(self, engine):
        if self.continuous is False or self._generate_fn is not None:
            return None
        from model.backend import open_slots
        slots = open_slots(engine.backend, self.max_batch, self.gpu_memory_fraction)
        if slots is None and self.continuous:
            raise ValueError("continuous batching needs the fast backend (--backend fast)")
        return slots

    def _serve_static(self):
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                deadline = time.monotonic() + self.batch_wait
                while len(self._pending) < self.max_batch and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopping:
                    return
                batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
                self._start(batch)
                self._running = batch
                self._free = 0
            try:
                self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything a batch does
                self._fail_jobs(batch, e)
            finally:
                with self._cond:
                    self._running = []
                    self._free = self.max_batch

    # -- continuous batching -------------------------------------------------------------------------
    def _serve_continuous(self, slots):
        from model.continuous import ContinuousBatch
        engine = self.engine
        batch = ContinuousBatch(slots, engine.tokenizer.pad_token_id, engine.eos_ids(), isolate_errors=True)
        live: Dict[int, Job] = {}                    # id(request) -> job
        self._outbox = {}
        quick_gil_handoffs()
        with self._cond:
            self._free = slots.slots
        held_since: Optional[float] = None           # when the running rows last waited for an admission
        while True:
            with self._cond:
                while not self._pending and not live and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for job in live.values():
                        self._finish(job, "error", NotReadyError("The server is shutting down."))
                    self._flush()
                    return
                newcomers = [self._pending.popleft() for _ in range(min(batch.free, len(self._pending)))]
                self._start(newcomers)
                self._running = list(live.values()) + newcomers
            for key, job in list(live.items()):
                if job.cancelled.is_set():
                    batch.cancel(job.request)
                    del live[key]
                    self._stats["cancelled"] += 1
                    self._finish(job, "cancelled")
            events = []
            try:
                newcomers = self._attach_images(newcomers)
                t0 = time.perf_counter()
                if newcomers:
                    events += batch.admit([job.request for job in newcomers])
                    live.update((id(job.request), job) for job in newcomers)
            except Exception as e:  # noqa: BLE001 - a failing prefill fails its newcomers only
                t0 = time.perf_counter()
                self._fail_jobs(newcomers, e)
                for job in newcomers:
                    batch.cancel(job.request)
                    live.pop(id(job.request), None)
            self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], len(batch.running))
            t1 = time.perf_counter()
            stepped = bool(batch.running)
            if stepped and self._arrivals_first(batch.free, held_since):
                held_since = held_since or time.monotonic()
                stepped = False
            else:
                held_since = None
            try:
                if stepped:
                    self._stats["steps"] += 1
                    events += batch.step()
            except Exception as e:  # noqa: BLE001 - a failing step fails every running row, not the worker
                self._fail_jobs(list(live.values()), e)
                for job in live.values():
                    batch.cancel(job.request)
                live.clear()
            t2 = time.perf_counter()
            for event in events:
                job = live.get(id(event.request))
                if job is None:
                    continue
                if event.token is not None:
                    self._token(job, event.token)
                if event.reason is not None:
                    del live[id(event.request)]
                    self._end(job)
            self._flush()
            if self.metrics is not None:
                if newcomers:
                    self.metrics.step("admit", t1 - t0)
                if stepped:
                    self.metrics.step("decode", t2 - t1)
                self.metrics.step("send", time.perf_counter() - t2)
            with self._cond:
                self._running = list(live.values())
                self._free = batch.free

    def _arrivals_first(self, room: int, held_since: Optional[float]) -> bool:
        """Whether to admit the requests that came during the last admission before the next decoding
        step. In a burst (64 requests sent at once reach the model over ~100 ms) this prefills each
        request as soon as the GPU is free, instead of interleaving decoding steps of those already in
        (8 ms each at 64 rows) or gathering the whole burst first (which left the prefill of all of them
        until the last one came). Running rows wait at most BURST_HOLD for their next token."""
        if not room or (held_since is not None and time.monotonic() - held_since >= BURST_HOLD):
            return False
        with self._cond:
            return bool(self._pending)

    def _fail_jobs(self, jobs: List[Job], e: Exception) -> None:
        log.exception("generation failed", exc_info=e)
        self._stats["errors"] += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        error = GenerationError(f"Generation failed: {type(e).__name__}: {e}")
        for job in jobs:
            if job.state != "done":
                self._finish(job, "error", error)

    def _token(self, job: Job, token: int) -> None:
        job.generated += 1
        self._stats["tokens"] += 1
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.token()
        self._push(job, [token])

    def _run_batch(self, batch: List[Job]):
        batch = self._attach_images(batch)
        if not batch:
            return
        self._stats["batches"] += 1
        self._stats["generate_calls"] += 1
        self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], len(batch))
        live = dict(enumerate(batch))
        steps = self._generate([job.request for job in batch])
        try:
            for step in steps:
                for b, job in list(live.items()):
                    if job.cancelled.is_set():
                        del live[b]
                        self._stats["cancelled"] += 1
                        self._finish(job, "cancelled")
                        continue
                    token = step[b]
                    if token is None:                    # finished: eos or its own error (length: below)
                        del live[b]
                        self._end(job)
                        continue
                    self._token(job, token)
                    if self._reason(job) == "length":
                        del live[b]
                        self._finish(job, "length")
                if not live:
                    break
        finally:
            steps.close()
        for job in live.values():                        # the generator ended: every row is done
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
            else:
                self._end(job)

    def _end(self, job: Job) -> None:
        """Finish a row that generate() ended: with its own error if sampling it failed (the rest of
        the batch goes on), else stop or length."""
        error = getattr(job.request, "error", None)
        if error is None:
            self._finish(job, self._reason(job))
            return
        log.error("generation failed for one request of the batch", exc_info=error)
        self._stats["errors"] += 1
        self._finish(job, "error", GenerationError(f"Generation failed: {type(error).__name__}: {error}"))

    def _generate(self, requests):
        if self._generate_fn is not None:
            return self._generate_fn(self.engine, requests)
        return self.engine.generate(requests, isolate_errors=True)

    def _attach_images(self, batch: List[Job]) -> List[Job]:
        """Encode the batch's images through the engine (one call; identical and recent images once).
        If encoding fails, the jobs with images end with that error and the others run."""
        need = [job for job in batch if job.pixels is not None]
        if not need:
            return batch
        start = time.perf_counter()
        try:
            embeds = self.engine.encode_images([job.pixels for job in need], [job.image_key for job in need])
            if self.metrics is not None:
                self.metrics.step("images", time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001
            log.exception("encoding images failed")
            error = GenerationError(f"Encoding the image failed: {type(e).__name__}: {e}")
            for job in need:
                self._finish(job, "error", error)
            return [job for job in batch if job.pixels is None]
        for job, emb in zip(need, embeds):
            job.request.image_embeds = emb
            job.pixels = None
        return batch

    @staticmethod
    def _reason(job: Job) -> str:
        p = job.request.params
        if len(job.request.ids) + job.generated >= p.max_length:
            return "length"
        if p.max_new_tokens is not None and job.generated >= p.max_new_tokens:
            return "length"
        return "stop"

    def _push(self, job: Job, item) -> None:
        if self._outbox is not None and threading.current_thread() is self._thread:
            # the continuous loop sends once per event loop per step, not once per token
            self._outbox.setdefault(job.loop, []).append((job, item))
            return
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, item)
        except RuntimeError:                 # the consumer's event loop is closed: nobody listens
            job.cancelled.set()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                for job, _ in items:
                    job.cancelled.set()

    def _finish(self, job: Job, reason: str, error: Optional[Exception] = None) -> None:
        if job.state == "done":
            return
        job.state = "done"
        job.finish_reason = reason
        job.error = error
        self._observe(reason, job)
        if job.loop is not None:
            self._push(job, Finished(reason, error))

    def _start(self, jobs: List[Job]) -> None:
        """Jobs leave the queue for the batch (with self._cond held)."""
        now = time.monotonic()
        for job in jobs:
            job.state = "running"
            if self.metrics is not None and job.submitted_at is not None:
                self.metrics.admitted(now - job.submitted_at, job.handoff)

    def _observe(self, outcome: str, job: Optional[Job] = None) -> None:
        if self.metrics is not None:
            self.metrics.observe(outcome, job)

    def _fail_pending(self, error: Exception) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for job in pending:
            self._finish(job, "error", error)
