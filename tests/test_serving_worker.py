"""The serving worker: batching, per-row settings, cancellation, the bounded queue, loading, errors,
image encoding once per batch, and streamed text that never takes anything back."""
import asyncio
import logging
import random
import threading
import time

import pytest
from PIL import Image, ImageDraw

from model.chat import ChatEngine
from model.prompts import has_chinese, process_response
from model.generation import generate
from model.sampling import SamplingParams
from serving import GenerationError, NotReadyError, QueueFullError, Worker
from serving.text import TextAssembler

from conftest import fail_rows, temperature_is


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok = tiny
    return ChatEngine(model, tok, allow_image_paths=False, allow_image_urls=False)


def picture(colour, shape="ellipse"):
    img = Image.new("RGB", (224, 224), "white")
    getattr(ImageDraw.Draw(img), shape)([50, 50, 170, 170], fill=colour)
    return img


RED, BLUE = picture("red"), picture("blue", "rectangle")


def params(n, **kw):
    return SamplingParams(**dict(dict(max_length=2048, max_new_tokens=n, top_k=1, repetition_penalty=1.2), **kw))


def reference(engine, query, image, n):
    """Greedy tokens of one request run alone through generate()."""
    emb = engine.encode_image(image) if image is not None else None
    req = engine.make_request(query, [], emb, not has_chinese(query), params(n))
    return [s[0] for s in generate(engine.model, [req], engine.tokenizer.pad_token_id, engine.eos_ids())]


class Counting:
    """A generate_fn that records each call's batch size and the number of steps it ran."""

    def __init__(self, fail_first=False):
        self.calls, self.steps, self.fail_first = [], 0, fail_first

    def __call__(self, engine, requests):
        self.calls.append(len(requests))
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        for step in generate(engine.model, requests, engine.tokenizer.pad_token_id, engine.eos_ids()):
            self.steps += 1
            yield step


async def collect(stream):
    out = []
    async for ids in stream:
        out += ids
    return out


def submit(worker, query, image=None, n=8, history=()):
    return worker.submit(worker.prepare(query, list(history), image, not has_chinese(query), params(n)))


async def idle(worker, timeout=10.0):
    end = time.monotonic() + timeout
    while worker.running or worker.queued:
        assert time.monotonic() < end, "the worker did not become idle"
        await asyncio.sleep(0.01)


CASES = [("描述这张图片。", RED, 12), ("What colour is the background?", None, 7), ("图中有什么？", BLUE, 15),
         ("Hello, who are you?", None, 3), ("有几个形状？", RED, 9)]


def test_waiting_requests_run_as_one_batch_with_their_own_settings(engine):
    counter = Counting()
    worker = Worker(engine, max_batch=8, batch_wait=0.3, generate_fn=counter).start()
    try:
        async def main():
            streams = [submit(worker, q, img, n) for q, img, n in CASES]
            return streams, await asyncio.gather(*(collect(s) for s in streams))
        streams, outs = asyncio.run(main())
    finally:
        worker.stop()
    assert counter.calls == [len(CASES)], "the five waiting requests should share one generate() call"
    assert worker.stats["max_batch_seen"] == len(CASES)
    for (q, img, n), out, stream in zip(CASES, outs, streams):
        assert out == reference(engine, q, img, n)
        assert stream.finish_reason == ("length" if len(out) == n else "stop")
        assert stream.completion_tokens == len(out) and stream.prompt_tokens > 0


def test_cancelling_a_running_row_stops_it_and_the_batch_ends_with_the_others(engine):
    counter = Counting()
    worker = Worker(engine, max_batch=2, batch_wait=0.3, generate_fn=counter).start()
    assert len(reference(engine, "描述这张图片。", None, 60)) == 60, "test needs a prompt that does not stop early"
    try:
        async def main():
            long = submit(worker, "描述这张图片。", None, 1500)
            short = submit(worker, "Hello, who are you?", None, 20)
            got = []
            async for ids in long:
                got += ids
                if len(got) >= 3:
                    long.cancel()
                    break
            short_ids = await collect(short)
            await idle(worker)
            return long, short_ids
        long, short_ids = asyncio.run(main())
    finally:
        worker.stop()
    assert long.finish_reason == "cancelled"
    assert long.completion_tokens < 15, "the cancelled row kept generating"
    assert counter.calls == [2]
    assert counter.steps <= max(len(short_ids), long.completion_tokens) + 2, "the batch ran on for the cancelled row"
    assert short_ids == reference(engine, "Hello, who are you?", None, 20)


def test_a_batch_of_cancelled_rows_is_closed_at_once(engine):
    counter = Counting()
    worker = Worker(engine, max_batch=4, batch_wait=0.0, generate_fn=counter).start()
    try:
        async def main():
            s = submit(worker, "描述这张图片。", None, 1500)
            async for _ in s:
                s.cancel()
                break
            start = time.monotonic()
            await idle(worker)
            return time.monotonic() - start
        waited = asyncio.run(main())
    finally:
        worker.stop()
    assert counter.steps <= 4 and waited < 2.0
    assert worker.stats["cancelled"] == 1


def test_full_queue_raises_and_cancelling_a_waiting_request_frees_its_place(engine):
    worker = Worker(engine, max_batch=1, max_queue=1, batch_wait=0.0).start()
    try:
        async def main():
            a = submit(worker, "描述这张图片。", None, 1500)
            first = await a.__aiter__().__anext__()          # a is running
            assert first
            b = submit(worker, "Hello", None, 4)              # waits
            with pytest.raises(QueueFullError):
                submit(worker, "Hello", None, 4)
            assert worker.stats["rejected"] == 1
            b.cancel()                                        # leaves the queue at once
            assert worker.queued == 0 and await collect(b) == [] and b.finish_reason == "cancelled"
            c = submit(worker, "What colour is the background?", None, 5)   # its place is free again
            a.cancel()
            c_ids = await collect(c)
            await idle(worker)
            return a, c, c_ids
        a, c, c_ids = asyncio.run(main())
    finally:
        worker.stop()
    assert a.finish_reason == "cancelled" and c.finish_reason in ("stop", "length")
    assert c_ids == reference(engine, "What colour is the background?", None, 5)


def test_loading_in_the_background_and_a_failed_load(engine):
    gate = threading.Event()

    def slow():
        gate.wait(10)
        return engine
    worker = Worker(loader=slow).start()
    try:
        assert worker.state == "loading" and not worker.ready
        with pytest.raises(NotReadyError, match="loading"):
            worker.prepare("hi", [], None, True, params(2))
        gate.set()
        assert worker.wait_ready(10) and worker.state == "ready"
    finally:
        worker.stop()

    def broken():
        raise FileNotFoundError("no weights here")
    failed = Worker(loader=broken).start()
    assert not failed.wait_ready(10)
    assert failed.state == "failed" and "no weights here" in failed.error
    with pytest.raises(NotReadyError, match="no weights here"):
        failed.require_ready()
    failed.stop()


def test_a_failing_batch_is_reported_and_the_worker_goes_on(engine):
    counter = Counting(fail_first=True)
    worker = Worker(engine, batch_wait=0.0, generate_fn=counter).start()
    try:
        async def main():
            with pytest.raises(GenerationError, match="out of memory"):
                await collect(submit(worker, "Hello", None, 4))
            return await collect(submit(worker, "Hello", None, 4))
        out = asyncio.run(main())
    finally:
        worker.stop()
    assert out == reference(engine, "Hello", None, 4)
    assert worker.stats["errors"] == 1 and counter.calls == [1, 1]


def test_images_are_encoded_once_per_batch_and_cached(engine, monkeypatch):
    expected = reference(engine, "描述这张图片。", RED, 3)
    sizes = []
    engine = ChatEngine(engine.model, engine.tokenizer, allow_image_paths=False, image_cache_size=4)  # empty cache
    original = engine.backend.encode_image
    monkeypatch.setattr(engine.backend, "encode_image", lambda x: sizes.append(x.shape[0]) or original(x))
    worker = Worker(engine, max_batch=4, batch_wait=0.3).start()
    try:
        async def main():
            batch = [submit(worker, q, img, 3) for q, img in
                     [("描述这张图片。", RED), ("图中有什么？", RED), ("有几个形状？", BLUE), ("Hello", None)]]
            outs = await asyncio.gather(*(collect(s) for s in batch))
            again = await collect(submit(worker, "描述这张图片。", RED, 3))
            return outs, again
        outs, again = asyncio.run(main())
    finally:
        worker.stop()
    assert sizes == [2], "two distinct images, encoded together once; the repeat came from the cache"
    assert worker.stats["image_cache_hits"] == 1
    assert again == outs[0] == expected


# -- streamed text -------------------------------------------------------------------------------------
PIECES = ["你好", ",", "世界", "[[训练", "时间]]", " ok", "!", " E", "ND", "图", "?", "a", ":", " ", "\n"]


def fake_decode(ids, final=True):
    return process_response("".join(PIECES[i] for i in ids))


def test_text_deltas_hold_back_what_may_still_change():
    t = TextAssembler(fake_decode)
    deltas = [t.add([0]), t.add([1]), t.add([2]), t.add([3]), t.add([4]), t.add([5]), t.add([6])]
    assert deltas == ["你好", "，", "世界", "", "2023年", " ok", ""]   # "好," is settled: 好 precedes it
    assert t.finish() == "!" and t.text == "你好，世界2023年 ok!"
    t = TextAssembler(fake_decode)
    assert [t.add([5]), t.add([1]), t.add([9]), t.add([10])] == ["ok", "", "，图", "？"]   # "ok," waits for "图"
    assert [t.add([11]), t.add([12]), t.finish()] == ["a", "", ":"]


def test_text_deltas_always_add_up_to_the_final_text():
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(PIECES)) for _ in range(rng.randrange(1, 25))]
        t = TextAssembler(fake_decode)
        out = ""
        for i in ids:
            out += t.add([i])
            assert fake_decode(ids).startswith(out) or not out
        out += t.finish()
        assert out == fake_decode(ids) == t.text


def test_stop_strings_cut_the_answer_and_are_never_shown():
    t = TextAssembler(fake_decode, stop=["END"])
    shown = t.add([0]) + t.add([5]) + t.add([7])
    assert not t.stopped and "E" not in shown
    shown += t.add([8])
    assert t.stopped
    shown += t.finish()
    assert shown == t.text == "你好 ok " and t.add([0]) == ""


def test_streamed_text_from_the_worker_equals_decoding_at_the_end(engine):
    worker = Worker(engine, batch_wait=0.0).start()
    try:
        async def main():
            stream = submit(worker, "描述这张图片。", RED, 40)
            text, ids, deltas = TextAssembler(engine.streaming_decode()), [], []   # as the server does
            async for new in stream:
                ids += new
                deltas.append(text.add(new))
            deltas.append(text.finish())
            return ids, deltas
        ids, deltas = asyncio.run(main())
    finally:
        worker.stop()
    assert "".join(deltas) == engine.decode(ids) and sum(1 for d in deltas if d) > 1


# -- one row's trouble stays in that row -------------------------------------------------------------
SEVEN = CASES + [("Is there a star?", BLUE, 6), ("Describe the image.", None, 10)]


def run_eight(engine, odd_params):
    """SEVEN greedy requests plus one with `odd_params`, all submitted before the worker wakes: one batch.
    -> (worker, [token ids or the exception, per request])."""
    worker = Worker(engine, max_batch=8, batch_wait=0.5).start()
    try:
        jobs = [worker.prepare(q, [], img, not has_chinese(q), params(n)) for q, img, n in SEVEN]
        jobs.insert(3, worker.prepare("描述这张图片。", [], RED, False, odd_params))

        async def main():
            streams = [worker.submit(job) for job in jobs]
            return await asyncio.gather(*(collect(s) for s in streams), return_exceptions=True)
        outs = asyncio.run(main())
    finally:
        worker.stop()
    assert worker.stats["generate_calls"] == 1 and worker.stats["max_batch_seen"] == 8
    return worker, outs[:3] + outs[4:], outs[3]


def test_a_row_with_an_extreme_penalty_runs_and_its_batch_is_unharmed(engine):
    # repetition_penalty 1e-300 is accepted (> 0); it used to make the fp32 divisor 0, the row's logits
    # inf/NaN, sampling raise, and the whole batch of eight fail
    odd = params(12, repetition_penalty=1e-300, temperature=1.0, top_k=100, top_p=0.4)
    worker, outs, odd_out = run_eight(engine, odd)
    for (q, img, n), out in zip(SEVEN, outs):
        assert out == reference(engine, q, img, n)
    assert isinstance(odd_out, list) and 1 <= len(odd_out) <= 12
    assert all(0 <= t < len(engine.tokenizer) + 8 for t in odd_out)
    assert worker.stats["errors"] == 0


def test_a_row_whose_sampling_fails_ends_alone_with_a_generation_error(engine, monkeypatch):
    marker = 0.31337                        # the temperature of the row made to fail
    expected = [reference(engine, q, img, n) for q, img, n in SEVEN]
    fail_rows(monkeypatch, temperature_is(marker), at_step=2)
    worker, outs, odd_out = run_eight(engine, params(40, temperature=marker))
    assert outs == expected, "the other seven rows must finish as if run alone"
    assert isinstance(odd_out, GenerationError) and odd_out.type == "generation_error" and odd_out.status == 500
    assert "ValueError" in odd_out.message and "NaN" in odd_out.message
    assert worker.stats["errors"] == 1


def test_a_load_failure_the_message_explains_gets_no_traceback_and_a_bug_does(caplog):
    from serving.errors import ModelLoadError

    def missing():
        raise ModelLoadError("Checkpoint 'x' not found. Looked in: here.")

    def bug():
        raise KeyError("model_class")
    with caplog.at_level(logging.DEBUG, logger="visualglm.serving"):
        explained = Worker(loader=missing).start()
        assert not explained.wait_ready(10)
        explained.stop()
        assert explained.error == "Checkpoint 'x' not found. Looked in: here."   # printed once, by the front end
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        broken = Worker(loader=bug).start()
        assert not broken.wait_ready(10)
        broken.stop()
    assert broken.error == "KeyError: 'model_class'"
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.exc_info is not None                    # an unexpected failure keeps its traceback


def test_the_sat_loader_turns_a_missing_checkpoint_into_a_model_load_error(tmp_path):
    from serving.cli import sat_engine_loader
    from serving.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="not found"):
        sat_engine_loader(str(tmp_path / "nothing-here"), device="cpu")()
