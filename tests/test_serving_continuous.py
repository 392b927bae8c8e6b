"""The serving worker with continuous batching (the fast backend on the CPU, tiny model): newcomers join a
running batch, greedy answers equal one-at-a-time answers, slots never leak, and GET /metrics."""
import asyncio
import random

from PIL import Image

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.chat import ChatEngine
from model.fast import FastBackend
from serving import Worker
from serving.app import create_app

from test_serving_worker import BLUE, RED, collect, idle, reference, submit

QUESTIONS = ["描述这张图片。", "What is in the picture?", "图中有几个图形？", "Is there a star?",
             "What colour is the circle?", "这是什么颜色？"]


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok = tiny
    return ChatEngine(FastBackend(model), tok, allow_image_paths=False, allow_image_urls=False)


@pytest.fixture(scope="module", params=[False, True], ids=["in-step", "ahead"])
def worker(engine, request):
    """ahead: the batch runs one step ahead, as it does on a GPU (model/continuous.py)."""
    import functools
    from model import continuous
    real = continuous.ContinuousBatch.__init__
    patch = pytest.MonkeyPatch()
    patch.setattr(continuous.ContinuousBatch, "__init__", functools.partialmethod(real, ahead=request.param))
    w = Worker(engine, max_batch=4, max_queue=300, batch_wait=0.0).start()
    assert w.wait_ready(60)
    yield w
    w.stop()
    patch.undo()


def test_the_fast_backend_batches_continuously_and_sat_statically(worker, tiny):
    assert worker.slots is not None and worker.slots_total == 4
    model, tok = tiny
    static = Worker(ChatEngine(model, tok, backend="sat")).start()
    try:
        assert static.wait_ready(30) and static.slots is None
    finally:
        static.stop()


def test_a_short_request_sent_after_a_long_one_finishes_first(worker):
    async def main():
        order, started = [], asyncio.Event()

        async def long():
            async for _ in submit(worker, "描述这张图片。", RED, n=200):
                started.set()                          # decoding has begun: now send the short one
            order.append("long")

        async def short():
            await started.wait()
            await collect(submit(worker, "What is in the picture?", RED, n=2))
            order.append("short")
        await asyncio.gather(long(), short())
        return order
    assert asyncio.run(main()) == ["short", "long"]
    assert worker.stats["max_batch_seen"] >= 2        # they ran side by side, not one after the other


def test_greedy_answers_under_load_equal_one_at_a_time(worker, engine):
    cases = [(QUESTIONS[i % len(QUESTIONS)], [RED, BLUE, None][i % 3], 4 + 5 * (i % 4)) for i in range(10)]
    expected = [reference(engine, q, img, n) for q, img, n in cases]

    async def main():
        async def run(i, q, img, n):
            await asyncio.sleep(0.02 * i)              # arrivals spread over the running batch
            return await collect(submit(worker, q, img, n=n))
        return await asyncio.gather(*(run(i, *c) for i, c in enumerate(cases)))
    assert asyncio.run(main()) == expected


def test_no_slot_leaks_after_200_mixed_requests_with_cancels(worker):
    rng = random.Random(0)

    async def main():
        async def run(i):
            stream = submit(worker, QUESTIONS[i % len(QUESTIONS)], [RED, BLUE, None][i % 3], n=rng.randint(1, 12))
            kind = i % 4
            if kind == 0:                                 # cancelled while waiting or at once
                stream.cancel()
                return
            got = 0
            async for ids in stream:                      # kind 1: the client leaves after its first tokens
                got += len(ids)
                if kind == 1 and got >= 2:
                    stream.cancel()
                    return
        await asyncio.gather(*(run(i) for i in range(200)))
        await idle(worker, 60)
    asyncio.run(main())
    assert worker.running == 0 and worker.queued == 0
    assert worker._free == worker.slots_total == 4


def _metrics(text):
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_move(worker):
    from test_api import LiveServer
    server = LiveServer(create_app(worker, model_name="visualglm-test", api_key="k"))
    try:
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
            assert c.get("/metrics").status_code == 401
            auth = {"Authorization": "Bearer k"}
            before = _metrics(c.get("/metrics", headers=auth).text)
            r = c.post("/v1/chat/completions", headers=auth, json={
                "messages": [{"role": "user", "content": "What is in the picture?"}], "max_tokens": 5,
                "temperature": 0})
            assert r.status_code == 200
            after = _metrics(c.get("/metrics", headers=auth).text)
    finally:
        server.close()
    tokens = "visualglm_generated_tokens_total[]"
    assert after[tokens] - before[tokens] == r.json()["usage"]["completion_tokens"] > 0
    outcome = "visualglm_requests_total[('outcome', 'length')]"
    assert after[outcome] - before.get(outcome, 0) == 1
    assert after["visualglm_time_to_first_token_seconds_count[]"] - before["visualglm_time_to_first_token_seconds_count[]"] == 1
    assert after["visualglm_kv_slots_total[]"] == 4
    assert after["visualglm_http_responses_total[('status', '401')]"] >= 1
    for name in ("queue_wait", "request_prepare"):
        counted = f"visualglm_{name}_seconds_count[]"
        assert after[counted] - before[counted] == 1, name
    assert after["visualglm_handoff_seconds_count[]"] == 0          # the model runs in this process
    public = create_app(worker, api_key="k", metrics_public=True)
    from fastapi.testclient import TestClient
    with TestClient(public) as c:
        assert c.get("/metrics").status_code == 200


def _record_batch_calls(monkeypatch, admit_seconds: float) -> list:
    """Log the continuous batch's admissions (how many requests) and steps, in order; each admission
    takes at least admit_seconds, so that requests pile up behind it as they would behind a GPU prefill."""
    import time
    from model import continuous
    calls = []
    real_admit, real_step = continuous.ContinuousBatch.admit, continuous.ContinuousBatch.step

    def admit(self, requests):
        calls.append(len(requests))
        time.sleep(admit_seconds)
        return real_admit(self, requests)

    def step(self):
        calls.append("step")
        return real_step(self)
    monkeypatch.setattr(continuous.ContinuousBatch, "admit", admit)
    monkeypatch.setattr(continuous.ContinuousBatch, "step", step)
    return calls


def _staggered(worker, count: int, gap: float, n: int = 3):
    async def main():
        async def run(i):
            await asyncio.sleep(gap * i)
            return await collect(submit(worker, QUESTIONS[i % len(QUESTIONS)], [RED, BLUE][i % 2], n=n))
        return await asyncio.gather(*(run(i) for i in range(count)))
    return asyncio.run(main())


def test_a_burst_is_admitted_as_it_arrives_before_anyone_decodes(engine, monkeypatch):
    """Requests arriving while others are being admitted are admitted next, before any decoding step:
    the first of a burst is prefilled at once (no waiting for the rest) and nobody's prefill waits
    behind decoding steps of the earlier ones."""
    calls = _record_batch_calls(monkeypatch, admit_seconds=0.05)
    w = Worker(engine, max_batch=8, max_queue=8, batch_wait=0.5).start()
    try:
        answers = _staggered(w, 5, gap=0.02)          # 20 ms apart, each admission 50 ms: they pile up
    finally:
        w.stop()
    admits = [c for c in calls if c != "step"]
    assert all(len(a) == 3 for a in answers)
    assert sum(admits) == 5 and admits[0] == 1 and len(admits) > 1     # waves as they came
    assert calls.index("step") == len(admits)                         # every admission before the first step


def test_running_rows_wait_for_a_burst_at_most_the_hold(engine, monkeypatch):
    """A burst that keeps arriving longer than BURST_HOLD lets the running rows step in between."""
    from serving import worker as worker_module
    monkeypatch.setattr(worker_module, "BURST_HOLD", 0.06)
    calls = _record_batch_calls(monkeypatch, admit_seconds=0.05)
    w = Worker(engine, max_batch=8, max_queue=8).start()
    try:
        answers = _staggered(w, 8, gap=0.02)          # arrivals for 140 ms, always one waiting
    finally:
        w.stop()
    assert all(len(a) == 3 for a in answers)
    first_step = calls.index("step")
    assert sum(c for c in calls[:first_step]) < 8     # stepped before the burst was all in


def test_follow_ups_of_every_running_conversation_find_their_image_encoded(tiny):
    """The image cache grows with the batch: 20 conversations with an image each, then a follow-up each
    sending the same image, encode 20 images, not 40 (the default cache holds 16)."""
    model, tok = tiny
    engine = ChatEngine(FastBackend(model), tok, allow_image_paths=False, allow_image_urls=False)
    worker = Worker(engine, max_batch=12, max_queue=100, batch_wait=0.0).start()
    images = [Image.new("RGB", (32, 32), (12 * i, 200 - 5 * i, 60)) for i in range(20)]
    try:
        assert worker.wait_ready(60) and engine.images.cache_size >= 20

        async def main():
            firsts = await asyncio.gather(*(collect(submit(worker, "What is in the picture?", img, n=2))
                                            for img in images))
            history = [("What is in the picture?", engine.decode(ids)) for ids in firsts]
            await asyncio.gather(*(collect(submit(worker, "And its colour?", img, n=2, history=[h]))
                                   for img, h in zip(images, history)))
        asyncio.run(main())
        assert worker.stats["images_encoded"] == 20 and worker.stats["image_cache_hits"] == 20
    finally:
        worker.stop()
