"""The serving worker with continuous batching (the fast backend on the CPU, tiny model): newcomers join a
running batch, greedy answers equal one-at-a-time answers, slots never leak, and GET /metrics."""
import asyncio
import random

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


def test_an_idle_worker_admits_a_staggered_burst_in_one_prefill_encoding_images_meanwhile(engine, monkeypatch):
    """Requests arriving a few ms apart at an idle worker are admitted together (one prefill), not in
    waves that make the later ones wait; their images are encoded while the rest arrive."""
    from model import continuous
    admitted, encoded = [], []
    real_admit = continuous.ContinuousBatch.admit
    monkeypatch.setattr(continuous.ContinuousBatch, "admit",
                        lambda self, reqs: admitted.append(len(reqs)) or real_admit(self, reqs))
    real_encode = engine.encode_images
    monkeypatch.setattr(engine, "encode_images", lambda pixels, keys: encoded.append(
        (len(pixels), len(admitted))) or real_encode(pixels, keys))
    w = Worker(engine, max_batch=8, max_queue=8, batch_wait=0.1).start()
    try:
        cases = [(QUESTIONS[i], [RED, BLUE][i % 2], 3) for i in range(5)]

        async def main():
            async def run(i, q, img, n):
                await asyncio.sleep(0.02 * i)          # 20 ms apart: within the 100 ms quiet window
                return await collect(submit(w, q, img, n=n))
            return await asyncio.gather(*(run(i, *c) for i, c in enumerate(cases)))
        answers = asyncio.run(main())
    finally:
        w.stop()
    assert admitted == [5] and all(len(a) == 3 for a in answers)
    assert sum(n for n, _ in encoded) == 5 and len(encoded) > 1       # as they came, all before the prefill:
    assert all(before == 0 for _, before in encoded)
