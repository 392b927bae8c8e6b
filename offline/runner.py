"""Records -> output records on one machine, in batches through the chat engine.

    loader threads:  Record -> Prepared (image decoded and preprocessed, prompt tokenized: engine.pixels,
                     engine.make_request(has_image=True)), up to two windows ahead of the model
    model thread:    static batching (any backend): a window of `batch_size * window_batches` prepared
                     records, sorted by prompt length, cut into batches (similar lengths together: little
                     padding); per batch one engine.encode_images call and one engine.generate call.
                     continuous batching (the fast backend): up to batch_size sequences decode together in
                     key/value slots; a finished one leaves at once and the next record takes its slot
                     (model/continuous.py), so no batch waits for its longest answer.

The engine is the one every front end uses (model/chat.py), so prompts, language, images and sampling
are exactly those of the terminal chat and the API; serving/worker.py batches the same two ways. Whatever
goes wrong with one record (its image, its prompt's length, its sampling) becomes that record's error
record; a static batch whose forward pass fails is retried one record at a time.
"""
import collections
import itertools
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Set, Union

import torch

from model.image_cache import pixels_key
from model.sampling import SamplingParams

from .inputs import Record

OnDone = Callable[[List[dict]], None]
BATCHING = ("auto", "continuous", "static")


class RunError(RuntimeError):
    """The run cannot go on; the message says why (no traceback needed)."""


class ModelError(RunError):
    """The model could not be loaded."""


@dataclass
class Settings:
    """What a run generates with; every output record reports it under "settings"."""
    max_length: int
    top_p: float
    top_k: int
    temperature: float
    repetition_penalty: float
    seed: Optional[int] = None         # per-record generators: the same answer in any batch, order or run
    english: bool = False              # always the English prompt format (else each question's language)
    model: Optional[str] = None

    def report(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "english"}


@dataclass
class Prepared:
    record: Record
    english: bool
    request: object                        # model.generation.Request, image slots left empty
    pixels: Optional[torch.Tensor] = None  # [1, 3, H, W] until encoded with its batch
    key: Optional[str] = None


class Runner:
    def __init__(self, engine, settings: Settings, batch_size: int = 8, window_batches: int = 4, workers: int = 4,
                 batching: str = "auto", gpu_memory_fraction: float = 0.9):
        """batching: "continuous" (the fast backend's key/value slots), "static" (engine.generate per
        batch) or "auto" (continuous when the backend can), as the server's --batching."""
        if batch_size < 1 or window_batches < 1 or workers < 1:
            raise ValueError("batch_size, window_batches and workers must be at least 1")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.engine, self.settings = engine, settings
        self.batch_size, self.window = batch_size, batch_size * window_batches
        self.workers, self.batching, self.gpu_memory_fraction = workers, batching, gpu_memory_fraction
        s = settings   # checked here, once: a bad flag is an error before any record is read
        self.params = SamplingParams(max_length=min(s.max_length, engine.max_context), top_p=s.top_p, top_k=s.top_k,
                                     temperature=s.temperature, repetition_penalty=s.repetition_penalty)
        self.settings.max_length = self.params.max_length

    # -- the pipeline -------------------------------------------------------------------------------
    def process(self, records: Iterable[Record], on_done: OnDone) -> None:
        """Answer every record; on_done(output records) as they complete (after each static batch, or
        every batch_size answers of a continuous batch), in the order they complete, not input order."""
        slots = self._open_slots()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="infer-loader")
        try:
            prepared = self._prepared(iter(records), pool)
            if slots is not None:
                self._continuous(prepared, slots, on_done)
            else:
                self._static(prepared, on_done)
        finally:   # Ctrl-C: do not wait for images nobody will use
            pool.shutdown(wait=False, cancel_futures=True)

    def _prepared(self, records: Iterator[Record], pool) -> Iterator[Union[Prepared, dict]]:
        """prepare() of every record, in input order, run by the loader threads up to two windows ahead
        of what the model takes, so that images are decoded while it generates."""
        ahead: collections.deque = collections.deque()
        while True:
            while len(ahead) < 2 * self.window:
                record = next(records, None)
                if record is None:
                    break
                ahead.append(pool.submit(self.prepare, record))
            if not ahead:
                return
            yield ahead.popleft().result()

    def _static(self, prepared: Iterator, on_done: OnDone) -> None:
        """Windows of prepared records sorted by prompt length, cut into batches that each run to
        their longest answer (engine.generate)."""
        while True:
            ready = list(itertools.islice(prepared, self.window))
            if not ready:
                return
            failed = [x for x in ready if isinstance(x, dict)]
            if failed:
                on_done(failed)
            todo = sorted((x for x in ready if isinstance(x, Prepared)), key=lambda x: len(x.request.ids))
            for i in range(0, len(todo), self.batch_size):
                on_done(self.run_batch(todo[i:i + self.batch_size]))

    def _open_slots(self):
        """Key/value slots for continuous batching (the fast backend), or None for static batches."""
        if self.batching == "static":
            return None
        from model.backend import open_slots
        try:
            slots = open_slots(self.engine.backend, self.batch_size, self.gpu_memory_fraction)
        except MemoryError as e:           # not even one sequence fits beside the weights
            raise RunError(str(e)) from None
        if slots is None and self.batching == "continuous":
            raise RunError("--batching continuous needs the fast backend (--backend fast)")
        return slots

    def _continuous(self, prepared: Iterator, slots, on_done: OnDone) -> None:
        """Up to batch_size sequences decode together; between steps, finished ones leave and the next
        prepared records are prefilled into their slots (model/continuous.py, as the server does)."""
        from model.continuous import ContinuousBatch
        batch = ContinuousBatch(slots, self.engine.tokenizer.pad_token_id, self.engine.eos_ids(), isolate_errors=True)
        live = {}                                           # id(request) -> (Prepared, tokens, start)
        out: List[dict] = []
        more = True
        while more or live:
            newcomers = []
            while more and len(newcomers) < batch.free:
                x = next(prepared, None)
                more = x is not None
                if isinstance(x, dict):
                    out.append(x)
                elif x is not None:
                    newcomers.append(x)
            events = []
            if newcomers:
                try:
                    self._attach_images(newcomers)
                    live.update((id(x.request), (x, [], time.perf_counter())) for x in newcomers)
                    events += batch.admit([x.request for x in newcomers])
                except Exception as e:  # noqa: BLE001 - a failing prefill fails its newcomers only
                    out += self._fail(batch, live, newcomers, e)
            if batch.running:
                try:
                    events += batch.step()
                except Exception as e:  # noqa: BLE001 - a failing step fails the running rows
                    out += self._fail(batch, live, [entry[0] for entry in live.values()], e)
            now = time.perf_counter()
            for event in events:
                entry = live.get(id(event.request))
                if entry is None:
                    continue
                if event.token is not None:
                    entry[1].append(event.token)
                if event.reason is not None:
                    del live[id(event.request)]
                    out.append(self.answer(entry[0], entry[1], now - entry[2], event.reason))
            if len(out) >= self.batch_size or (out and not (more or live)):
                on_done(out)
                out = []

    def _fail(self, batch, live: dict, items: List[Prepared], e: Exception) -> List[dict]:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for x in items:
            batch.cancel(x.request)
            live.pop(id(x.request), None)
        return [self.error(x.record, f"generation failed: {_message(e)}", x.english) for x in items]

    def prepare(self, record: Record) -> Union[Prepared, dict]:
        """(loader thread) Read and preprocess the image, build and tokenize the prompt; an error record
        if that fails."""
        if record.error is not None:
            return self.error(record, record.error)
        english = record.language(self.settings.english)
        try:
            pixels = key = None
            if record.image is not None:
                pixels = self.engine.pixels(record.image).float().contiguous()   # [1, 3, H, W]
                key = pixels_key(pixels)
            request = self.engine.make_request(record.query, record.history, None, english, self.params,
                                               self._generator(record.id), has_image=pixels is not None)
        except Exception as e:  # noqa: BLE001 - an unreadable image, a prompt too long: this record's error
            return self.error(record, _message(e), english)
        return Prepared(record, english, request, pixels, key)

    def run_batch(self, batch: List[Prepared]) -> List[dict]:
        """One batch through the model -> its output records. A failing forward pass (e.g. out of
        memory) is retried record by record, so it costs only the record that cannot run."""
        try:
            return self._generate(batch)
        except Exception as e:  # noqa: BLE001
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [self.error(batch[0].record, f"generation failed: {_message(e)}", batch[0].english)]
            return [out for item in batch for out in self.run_batch([item])]

    def _generate(self, batch: List[Prepared]) -> List[dict]:
        start = time.perf_counter()
        self._attach_images(batch)
        tokens: List[List[int]] = [[] for _ in batch]
        ended: List[Optional[float]] = [None] * len(batch)
        for step in self.engine.generate([x.request for x in batch], isolate_errors=True):
            now = time.perf_counter()
            for b, token in enumerate(step):
                if token is not None:
                    tokens[b].append(token)
                elif ended[b] is None:
                    ended[b] = now
        end = time.perf_counter()
        return [self.answer(x, ids, (t or end) - start) for x, ids, t in zip(batch, tokens, ended)]

    def _attach_images(self, batch: List[Prepared]) -> None:
        """One encoder call for the batch's images (identical images once); emb [L, hidden] each."""
        with_image = [x for x in batch if x.pixels is not None]
        if with_image:
            embeds = self.engine.encode_images([x.pixels for x in with_image], [x.key for x in with_image])
            for x, emb in zip(with_image, embeds):
                x.request.image_embeds, x.pixels = emb, None

    # -- output records -----------------------------------------------------------------------------
    def answer(self, x: Prepared, ids: List[int], seconds: float, reason: Optional[str] = None) -> dict:
        """reason: "stop" / "length" / "error" when the decoding loop says (continuous batching);
        otherwise told from the lengths, by the rules of model.generation."""
        if x.request.error is not None:
            return self.error(x.record, f"generation failed: {_message(x.request.error)}", x.english)
        p, n = x.request.params, len(ids)
        if reason is None:
            length = len(x.request.ids) + n >= p.max_length or (p.max_new_tokens is not None and n >= p.max_new_tokens)
            reason = "length" if length else "stop"
        return dict(self._head(x.record, x.english), response=self.engine.decode(ids),
                    finish_reason=reason, prompt_tokens=len(x.request.ids),
                    completion_tokens=n, seconds=round(seconds, 4), settings=self.settings.report())

    def error(self, record: Record, message: str, english: Optional[bool] = None) -> dict:
        return dict(self._head(record, english), error=message, settings=self.settings.report())

    @staticmethod
    def _head(record: Record, english: Optional[bool]) -> dict:
        head = {"id": record.id, "text": record.query, "image": record.image}
        if record.history:
            head["history"] = [list(turn) for turn in record.history]
        if english is not None:
            head["english"] = english
        return head

    def _generator(self, rid: str) -> Optional[torch.Generator]:
        if self.settings.seed is None:
            return None
        return torch.Generator().manual_seed((self.settings.seed * 1_000_003 + zlib.crc32(rid.encode())) % 2 ** 63)


def _message(e: BaseException) -> str:
    text = str(e)
    return text if isinstance(e, ValueError) and text else f"{type(e).__name__}: {text}"


# -- which records to run, and the count of what happened -------------------------------------------
@dataclass
class Summary:
    answered: int = 0
    failed: int = 0
    skipped: int = 0                 # already in the output (a rerun resumes)
    duplicates: int = 0              # an id seen earlier in the same input
    images: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        self.start = time.perf_counter()

    def add(self, records: List[dict]) -> None:
        for r in records:
            if "error" in r:
                self.failed += 1
            else:
                self.answered += 1
                self.images += r.get("image") is not None
                self.tokens += r["completion_tokens"]

    def text(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return (f"done {self.answered}, failed {self.failed}, skipped {self.skipped} (already in the output)"
                + (f", {self.duplicates} duplicate id(s) ignored" if self.duplicates else "")
                + f" in {seconds:.1f} s: {self.images / seconds:.2f} images/s, {self.tokens / seconds:.1f} tokens/s")


def pending(records: Iterable[Record], done: Set[str], summary: Optional[Summary] = None) -> Iterator[Record]:
    """The records still to answer: not in the output yet, each id once."""
    seen = set()
    for r in records:
        if r.id in done:
            if summary:
                summary.skipped += 1
        elif r.id in seen:
            if summary:
                summary.duplicates += 1
        else:
            seen.add(r.id)
            yield r


# -- building a runner from the command line's options (here and in each Ray actor) ---------------------
def build_runner(options: dict) -> Runner:
    """options: from_pretrained, device, quant, tokenizer, backend, batch_size, window_batches, workers
    and the Settings fields (infer.py's flags, as a plain dict that can travel to a Ray actor)."""
    from model.chat import ChatEngine
    from model.sat.checkpoint import CheckpointError
    from model.sat.device_map import DeviceMapError, backend_for
    from model.sat.loading import load_model_and_tokenizer

    o = options
    try:
        model, tokenizer = load_model_and_tokenizer(o["from_pretrained"], device=o.get("device"), quant=o.get("quant"),
                                                    tokenizer=o.get("tokenizer"), device_map=o.get("device_map"),
                                                    backend=o.get("backend", "auto"))
        backend = backend_for(o.get("device_map"), o.get("backend", "auto"))
    except (CheckpointError, DeviceMapError) as e:
        raise ModelError(str(e)) from None
    model.eval()
    engine = ChatEngine(model, tokenizer, backend=backend)
    settings = Settings(**{k: o[k] for k in Settings.__dataclass_fields__ if k in o})
    return Runner(engine, settings, o.get("batch_size", 8), o.get("window_batches", 4), o.get("workers", 4),
                  o.get("batching", "auto"), o.get("gpu_memory_fraction", 0.9))
