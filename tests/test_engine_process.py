"""The model in its own process (serving/engine_process.py), tiny model on the CPU with continuous batching:
greedy answers equal the in-process worker's (plain, streamed, concurrent), the same 4xx for a prompt too
long, a disconnect frees the slot, a full queue refuses, the step messages batch the rows' tokens, the
metrics move, a killed child fails its streams with a 5xx and /health says failed, api.py --engine-process
on reports a missing checkpoint, and stop() leaves no process behind."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.sampling import SamplingParams
from serving import NotReadyError, QueueFullError, Worker
from serving.app import create_app
from serving.cli import sat_engine_loader
from serving.engine_process import ProcessWorker

from conftest import free_port
from test_api import BLUE_URL, LONG, RED_URL, ROOT, LiveServer, chat_body, read_tokens, sse_events, wait_for

OPTIONS = dict(max_batch=4, max_queue=4, batch_wait=0.05)


@pytest.fixture(scope="module")
def loader(ckpt_dir):
    return sat_engine_loader(str(ckpt_dir), device="cpu", backend="fast")      # fast: continuous batching on CPU


@pytest.fixture(scope="module")
def remote(loader):
    """One child process shared by the module's tests (spawning and loading take seconds)."""
    w = ProcessWorker(loader, **OPTIONS).start()
    assert w.wait_ready(120), w.error
    yield w
    w.stop()


@pytest.fixture(scope="module")
def servers(remote, loader):
    """(process worker's server, in-process worker's server) on the same checkpoint."""
    local = Worker(loader=loader, **OPTIONS)
    a, b = LiveServer(create_app(remote, model_name="m")), LiveServer(create_app(local, model_name="m"))
    assert local.wait_ready(60)
    yield a, b
    a.close()
    b.close()


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=120, trust_env=False, **kw)


def streamed_text(url, body) -> str:
    with httpx.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True), timeout=120,
                      trust_env=False) as s:
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


BODIES = [chat_body("Hello, who are you?", max_tokens=12),
          chat_body([{"type": "image_url", "image_url": {"url": RED_URL}}, {"type": "text", "text": "描述这张图片。"}],
                    max_tokens=16),
          chat_body([{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": BLUE_URL}}],
                    max_tokens=9)]


def test_greedy_answers_equal_the_in_process_workers(servers, remote):
    there, here = servers
    expected = []
    for body in BODIES:
        local = post(here.url, "/v1/chat/completions", body).json()
        r = post(there.url, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0] == local["choices"][0] and r.json()["usage"] == local["usage"]
        assert streamed_text(there.url, body) == local["choices"][0]["message"]["content"]
        expected.append(local["choices"][0]["message"]["content"])
    original = {"text": "描述这张图片。", "image": RED_URL.split(",", 1)[1], "max_length": 90, "top_k": 1}
    assert post(there.url, "/", original).json()["response"] == post(here.url, "/", original).json()["response"]

    async def together():                              # side by side in the child's batch
        async with httpx.AsyncClient(base_url=there.url, timeout=120, trust_env=False) as c:
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in BODIES * 2))
        return [r.json()["choices"][0]["message"]["content"] for r in rs]
    assert asyncio.run(together()) == expected * 2
    wait_for(lambda: remote.stats["max_batch_seen"] > 1, 2, "the child's counters (sent every 0.1 s)")


def test_a_prompt_too_long_gets_the_same_4xx(servers):
    there, here = servers
    body = {"text": "描述这张图片。" * 20, "max_length": 10}
    a, b = post(there.url, "/", body), post(here.url, "/", body)
    assert a.status_code == b.status_code == 400 and a.json() == b.json()
    assert a.json()["error"]["type"] == "context_length_exceeded"


def test_a_disconnect_frees_the_slot_and_health_follows(servers, remote):
    there, _ = servers
    cancelled = remote.stats["cancelled"]
    with httpx.Client(base_url=there.url, timeout=60, trust_env=False) as c:
        with c.stream("POST", "/v1/chat/completions", json=LONG) as s:
            lines = s.iter_lines()            # kept: dropping it would close the connection
            read_tokens(lines, 3)
            wait_for(lambda: remote.running == 1, 5, "the child to report the running row")
            health = c.get("/health").json()
            assert health["running"] == 1 and health["batching"] == "continuous" and health["slots"] == 4
    wait_for(lambda: remote.running == 0 and remote.stats["cancelled"] == cancelled + 1, 10, "the row to stop")


def test_tokens_come_one_message_per_step_and_a_full_queue_refuses(remote):
    """Four rows decoding together: the child sends one message per step, not one per token. Then
    max_batch + max_queue unfinished requests fill every place: the next one gets QueueFullError."""
    async def main():
        messages = remote.messages
        jobs = [remote.prepare(q, [], None, True, SamplingParams(max_new_tokens=10, top_k=1, max_length=2048))
                for q in ("Hello", "What is it?", "Describe it.", "Why?")]
        streams = [remote.submit(job) for job in jobs]            # one event loop tick: admitted together

        async def drain(stream):
            return [i async for ids in stream for i in ids]
        tokens = sum(map(len, await asyncio.gather(*map(drain, streams))))
        assert tokens > 4 and remote.messages - messages < tokens / 2, (remote.messages - messages, tokens)

        long = SamplingParams(max_new_tokens=1500, top_k=1, max_length=2048)
        streams = [remote.submit(remote.prepare("描述这张图片。", [], None, False, long)) for _ in range(8)]
        with pytest.raises(QueueFullError):
            remote.submit(remote.prepare("Hello", [], None, True, long))
        for s in streams:
            s.cancel()
        for s in streams:
            await drain(s)
        assert [s.finish_reason for s in streams] == ["cancelled"] * 8
    asyncio.run(main())
    assert remote.stats["rejected"] == 1


def _metrics(text):
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _settled_metrics(url):
    """The metrics once the child's reports (every 0.1 s) of earlier tests' requests have all come in."""
    last = None
    for _ in range(50):
        now = {k: v for k, v in _metrics(httpx.get(url + "/metrics", trust_env=False).text).items()
               if "_created" not in k and "http_responses" not in k}          # this GET is counted
        if now == last:
            return now
        last = now
        time.sleep(0.3)
    raise AssertionError("the metrics kept changing with no requests running")


def test_metrics_move(servers):
    there, _ = servers
    before = _settled_metrics(there.url)
    r = post(there.url, "/v1/chat/completions", chat_body("What is in the picture?", max_tokens=5))
    wait_for(lambda: _metrics(httpx.get(there.url + "/metrics", trust_env=False).text).get(
        "visualglm_batch_step_seconds_count[('phase', 'decode')]", 0) >
        before.get("visualglm_batch_step_seconds_count[('phase', 'decode')]", 0), 5, "the step metric")
    after = _metrics(httpx.get(there.url + "/metrics", trust_env=False).text)
    tokens = "visualglm_generated_tokens_total[]"
    assert after[tokens] - before[tokens] == r.json()["usage"]["completion_tokens"] > 0
    ttft = "visualglm_time_to_first_token_seconds_count[]"
    assert after[ttft] - before[ttft] == 1 and after["visualglm_kv_slots_total[]"] == 4
    # the child measured the wait from the parent's queueing: the handoff is part of it, the whole wait
    # comes before the first token
    count, total = "visualglm_{}_seconds_count[]", "visualglm_{}_seconds_sum[]"
    for name in ("queue_wait", "handoff"):
        assert after[count.format(name)] - before.get(count.format(name), 0) == 1
    delta = {name: after[total.format(name)] - before.get(total.format(name), 0)
             for name in ("queue_wait", "handoff", "time_to_first_token")}
    assert 0 < delta["handoff"] <= delta["queue_wait"] < delta["time_to_first_token"], delta


def test_a_killed_child_fails_its_requests_with_5xx_and_health_says_failed(loader):
    remote = ProcessWorker(loader, **OPTIONS)
    server = LiveServer(create_app(remote))
    box = {}
    try:
        assert remote.wait_ready(120)
        plain = threading.Thread(target=lambda: box.update(r=post(server.url, "/v1/chat/completions",
                                                                   dict(LONG, stream=False))))
        plain.start()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=LONG, timeout=60, trust_env=False) as s:
            lines = s.iter_lines()
            read_tokens(lines, 2)
            wait_for(lambda: remote.running == 2, 10, "both requests to run")
            os.kill(remote.pid, signal.SIGKILL)
            events = sse_events(lines)
        plain.join(30)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "generation_error"
        assert box["r"].status_code == 500 and box["r"].json()["error"]["type"] == "generation_error"
        health = httpx.get(server.url + "/health", trust_env=False)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "SIGKILL" in health.json()["error"]
        again = post(server.url, "/v1/chat/completions", chat_body("Hello"))
        assert again.status_code == 503 and again.json()["error"]["type"] == "model_not_ready"
    finally:
        server.close()
        remote.stop()


def test_api_py_with_the_engine_process_reports_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "api.py", "--from_pretrained", str(tmp_path / "nothing-here"), "--host",
                        "127.0.0.1", "--port", str(free_port()), "--device", "cpu", "--engine-process", "on"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "not found" in line][0].startswith(
        "error: could not load the model: Checkpoint")


def test_stop_ends_the_child_and_its_streams(remote):
    """Last in this module: it stops the shared child."""
    pid = remote.pid

    async def main():
        job = remote.prepare("描述这张图片。", [], None, False, SamplingParams(max_new_tokens=1500, top_k=1))
        stream = remote.submit(job)
        async for _ in stream:
            break
        await asyncio.to_thread(remote.stop)
        with pytest.raises(NotReadyError):
            async for _ in stream:
                pass
    asyncio.run(main())
    assert remote.state == "stopped" and not remote._process.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_submitting_never_waits_for_the_model_process_to_read(loader):
    """A request's pixels are more than a pipe holds, and writing them blocks until the child reads. While
    the child is frozen (SIGSTOP), submit() must still return at once (the sender thread waits instead);
    once it runs again, every request is answered."""
    from PIL import Image
    remote = ProcessWorker(loader, **OPTIONS).start()
    assert remote.wait_ready(120), remote.error
    params = SamplingParams(max_new_tokens=3, top_k=1, max_length=2048)
    images = [Image.new("RGB", (224, 224), (40 * i, 90, 200)) for i in range(4)]
    jobs = [remote.prepare("What is it?", [], img, True, params) for img in images]
    try:
        async def main():
            os.kill(remote.pid, signal.SIGSTOP)
            wake = threading.Timer(2.0, os.kill, (remote.pid, signal.SIGCONT))   # if submit blocks after all
            wake.start()
            try:
                start = time.monotonic()
                streams = [remote.submit(job) for job in jobs]         # 4 x 150 KB into a 64 KB pipe
                took = time.monotonic() - start
            finally:
                wake.cancel()
                os.kill(remote.pid, signal.SIGCONT)
            answers = [[i async for ids in s for i in ids] for s in streams]
            return took, answers, [s.finish_reason for s in streams]
        took, answers, reasons = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        remote.stop()
    assert took < 0.5, f"submit waited {took:.2f} s for the frozen model process"
    assert reasons == ["length"] * 4 and all(len(a) == 3 for a in answers)
