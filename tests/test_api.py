"""The HTTP API, live: uvicorn on a loopback port with the tiny model, driven over real HTTP.

Original contract, text-only and history, OpenAI non-stream / stream (SSE parsed) / the openai client,
stop strings, seeds, /health and /v1/models; 80 bad requests that must each get a 4xx JSON error while
the server keeps serving; `<img>` tags that must never be opened; remote image URLs only when allowed;
16 concurrent clients whose greedy answers equal sequential ones and that really share batches;
/health during generation; disconnects freeing rows and queue places; 503 on a full queue and while
loading; the api.py command line. Hostile clients: one failing row of a batch gets its own JSON error,
keep-alive connections survive error answers, uploads cut short are one log line, non-JSON content
types get 415 and trailing slashes are not redirected.
"""
import asyncio
import base64
import http.client
import http.server
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image, ImageDraw

from model.chat import ChatEngine
from model.prompts import has_chinese
from model.sampling import SamplingParams
from serving import Worker
from serving.app import create_app

from conftest import fail_rows, free_port, temperature_is

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 300_000          # the test server's image byte limit (413 above)
LIMIT_PIXELS = 4_000_000       # ... and pixel limit (decompression bombs)


# -- a live server ---------------------------------------------------------------------------------------
class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


class Canary:
    """A loopback HTTP server that serves one PNG and counts every request it gets."""

    def __init__(self, png: bytes):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", "/img.png")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def picture(colour, shape="ellipse"):
    img = Image.new("RGB", (224, 224), "white")
    getattr(ImageDraw.Draw(img), shape)([50, 50, 170, 170], fill=colour)
    return img


RED, BLUE = picture("red"), picture("blue", "rectangle")
RED_PNG, BLUE_PNG = png_bytes(RED), png_bytes(BLUE)
RED_B64 = base64.b64encode(RED_PNG).decode()
RED_URL = "data:image/png;base64," + RED_B64
BLUE_URL = "data:image/png;base64," + base64.b64encode(BLUE_PNG).decode()


def noise_png(size) -> bytes:
    return png_bytes(Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)))


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny):
    model, tok = tiny
    return ChatEngine(model, tok, allow_image_paths=False, allow_image_urls=False)


@pytest.fixture(scope="module")
def worker(engine):
    w = Worker(engine, max_batch=8, max_queue=16, batch_wait=0.05).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def api(worker):
    server = LiveServer(create_app(worker, model_name="visualglm-test", max_image_bytes=LIMIT_BYTES,
                                   max_image_pixels=LIMIT_PIXELS))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(api):
    with httpx.Client(base_url=api.url, timeout=60, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def canary():
    c = Canary(RED_PNG)
    yield c
    c.close()


def reference(engine, query, image=None, history=(), english=None, **sampling):
    """The engine's own answer, computed in this thread while the server is idle."""
    params = SamplingParams(**dict(dict(top_p=0.4, temperature=0.8, top_k=100, repetition_penalty=1.2), **sampling))
    english = (not has_chinese(query)) if english is None else english
    return engine.chat(None, query, history=list(history), image=image, english=english, params=params)[0]


def prompt_tokens(engine, query, with_image, history=()):
    stand_in = engine.encode_image(RED) if with_image else None
    return len(engine.make_request(query, list(history), stand_in, not has_chinese(query), SamplingParams()).ids)


def sse_events(lines):
    """data: payloads of a server-sent event stream, the last one being [DONE]."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[len("data: "):])
    return out


def chat_body(content, **kw):
    return dict({"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0}, **kw)


# A request that runs for a long time with the tiny model (no end-of-answer token for hundreds of steps)
LONG = chat_body([{"type": "image_url", "image_url": {"url": RED_URL}}, {"type": "text", "text": "描述这张图片。"}],
                 max_tokens=1500, stream=True)


def read_tokens(lines, n):
    """Read server-sent events until n chunks with generated text have arrived."""
    got = 0
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            got += 1
            if got == n:
                return
    raise AssertionError("the stream ended early")


# -- the happy paths -------------------------------------------------------------------------------------
def test_health_and_models(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "visualglm-test"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["visualglm-test"]
    assert client.get("/v1/models/visualglm-test").json()["id"] == "visualglm-test"


def test_original_contract_with_an_image(client, engine):
    r = client.post("/", json={"text": "描述这张图片。", "image": RED_B64, "max_length": 90, "top_k": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["response"] == out["result"] == reference(engine, "描述这张图片。", RED, max_length=90, top_k=1)
    assert out["response"] and out["status"] == 200
    assert out["history"] == [["描述这张图片。", out["response"]]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out["time"])


def test_original_contract_text_only_history_and_language(client, engine):
    first = client.post("/", json={"text": "Hello, who are you?", "max_length": 40, "top_k": 1}).json()
    assert first["response"] == reference(engine, "Hello, who are you?", max_length=40, top_k=1)   # English template
    second = client.post("/", json={"text": "图片里有几个形状？", "history": first["history"], "max_length": 70,
                                    "top_k": 1, "repetition_penalty": 1.5}).json()
    expected = reference(engine, "图片里有几个形状？", history=[tuple(first["history"][0])], max_length=70, top_k=1,
                         repetition_penalty=1.5)
    assert second["response"] == expected
    assert second["history"] == first["history"] + [["图片里有几个形状？", expected]]
    forced = client.post("/", json={"text": "Hello, who are you?", "english": False, "max_length": 40, "top_k": 1})
    assert forced.json()["response"] == reference(engine, "Hello, who are you?", english=False, max_length=40, top_k=1)


def test_openai_chat_completions_plain_and_streamed(client, engine):
    content = [{"type": "text", "text": "描述这张图片。"}, {"type": "image_url", "image_url": {"url": RED_URL}}]
    body = chat_body(content, max_tokens=20)
    expected = reference(engine, "描述这张图片。", RED, max_length=2048, max_new_tokens=20, temperature=0)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "visualglm-test" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == prompt_tokens(engine, "描述这张图片。", True)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (choice["finish_reason"] == "length") == (usage["completion_tokens"] == 20)

    with client.stream("POST", "/v1/chat/completions",
                       json=dict(body, stream=True, stream_options={"include_usage": True})) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text_chunks = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(text_chunks) == expected and sum(1 for t in text_chunks if t) > 1
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [choice["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_the_openai_python_client_works_against_the_server(api, engine):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=f"{api.url}/v1", api_key="not-needed", max_retries=0, timeout=60)
    assert [m.id for m in oc.models.list()] == ["visualglm-test"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is the background?"},
                                             {"type": "image_url", "image_url": {"url": BLUE_URL}}]}]
    expected = reference(engine, "What colour is the background?", BLUE, max_length=2048, max_new_tokens=10,
                         temperature=0)
    done = oc.chat.completions.create(model="visualglm-test", messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].message.content == expected
    parts = [c.choices[0].delta.content or "" for c in
             oc.chat.completions.create(model="visualglm-test", messages=messages, max_tokens=10, temperature=0,
                                        stream=True) if c.choices]
    assert "".join(parts) == expected


def test_multi_turn_openai_messages_and_system_prompt(client, engine):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED_URL}},
                                             {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "What colour is it?"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    expected = reference(engine, "What colour is it?", RED, history=[("Be brief.\nDescribe the image.", "A red circle.")],
                         max_length=2048, max_new_tokens=8, temperature=0)
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_stop_strings_end_the_answer(client):
    full = client.post("/v1/chat/completions", json=chat_body("Describe the image.", max_tokens=40)).json()
    text = full["choices"][0]["message"]["content"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and
                text.find(text[i:i + 2]) == i)
    cut = client.post("/v1/chat/completions", json=chat_body("Describe the image.", max_tokens=40, stop=[stop])).json()
    assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions",
                       json=chat_body("Describe the image.", max_tokens=40, stop=stop, stream=True)) as s:
        chunks = [json.loads(e) for e in sse_events(s.iter_lines())[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text[:text.find(stop)]


def test_a_seed_makes_sampling_reproducible(client):
    body = chat_body("Describe the image.", max_tokens=12, temperature=1.0, top_p=1.0, seed=1234)
    a, b = (client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] for _ in range(2))
    assert a == b


# -- bad input -----------------------------------------------------------------------------------------------
def _bad_requests():
    big_text = "x" * (16 * 2048 + 10)
    bomb = base64.b64encode(png_bytes(Image.new("1", (6000, 6000)))).decode()
    huge = base64.b64encode(noise_png(400)).decode()
    truncated = base64.b64encode(noise_png(64)[:3000]).decode()
    not_image = base64.b64encode(b"hello, this is not an image at all").decode()
    gif_text = base64.b64encode(b"GIF89a" + b"\x00" * 20).decode()
    ok = {"text": "hi"}

    def orig(**kw):
        return ("POST", "/", {"json": dict(ok, **kw)})

    def raw(path, data, status=400):
        return ("POST", path, {"content": data, "headers": {"content-type": "application/json"}}), status

    def oa(status=400, **kw):
        body = dict({"messages": [{"role": "user", "content": "hi"}]}, **kw)
        return ("POST", "/v1/chat/completions", {"json": body}), status

    def msgs(*messages, status=400):
        return ("POST", "/v1/chat/completions", {"json": {"messages": list(messages)}}), status

    def img(url, status=400):
        return msgs({"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image_url", "image_url": {"url": url}}]}, status=status)

    cases = {
        # -- POST /: the body itself
        "malformed json": raw("/", b'{"text": "hi"'),
        "empty body": raw("/", b""),
        "json array": raw("/", b'[1, 2]'),
        "json string": raw("/", b'"hi"'),
        "json null": raw("/", b"null"),
        "not utf-8": raw("/", b'{"text": "\xff\xfe"}'),
        "deep nesting": raw("/", b"[" * 100_000 + b"]" * 100_000),
        "NaN literal": raw("/", b'{"text": "hi", "temperature": NaN}'),
        "Infinity literal": raw("/", b'{"text": "hi", "top_p": Infinity}'),
        "lone surrogate": raw("/", b'{"text": "\\ud800 hi"}'),
        "body over the limit": raw("/", b'{"text": "' + b"a" * 3_000_000 + b'"}', 413),
        # -- POST /: fields
        "missing text": (("POST", "/", {"json": {"image": RED_B64}}), 400),
        "text null": (orig(text=None), 400),
        "text int": (orig(text=3), 400),
        "text list": (orig(text=["hi"]), 400),
        "text empty": (orig(text=""), 400),
        "text blank": (orig(text="  \n "), 400),
        "history string": (orig(history="abc"), 400),
        "history dict": (orig(history={"q": "a"}), 400),
        "history single": (orig(history=[["only a question"]]), 400),
        "history ints": (orig(history=[[1, 2]]), 400),
        "image int": (orig(image=5), 400),
        "image bad base64": (orig(image="!!!not base64!!!"), 400),
        "image truncated base64": (orig(image="QUJDRA=Q"), 400),
        "image not an image": (orig(image=not_image), 400),
        "image fake gif": (orig(image=gif_text), 400),
        "image truncated": (orig(image=truncated), 400),
        "image bomb": (orig(image=bomb), 400),
        "image too many bytes": (orig(image=huge), 413),
        "image path": (orig(image="/etc/passwd"), 400),
        "image url not allowed": (orig(image="http://127.0.0.1:9/x.png"), 400),
        "image data url text": (orig(image="data:text/plain;base64,aGVsbG8="), 400),
        "max_length string": (orig(max_length="100"), 400),
        "max_length float": (orig(max_length=1.5), 400),
        "max_length zero": (orig(max_length=0), 400),
        "max_length negative": (orig(max_length=-5), 400),
        "max_length huge": (orig(max_length=10 ** 9), 400),
        "max_length bool": (orig(max_length=True), 400),
        "top_p above 1": (orig(top_p=1.5), 400),
        "top_p negative": (orig(top_p=-0.1), 400),
        "top_p string": (orig(top_p="high"), 400),
        "top_k negative": (orig(top_k=-1), 400),
        "top_k absurd": (orig(top_k=1e12), 400),
        "top_k fraction": (orig(top_k=2.5), 400),
        "temperature negative": (orig(temperature=-1), 400),
        "temperature absurd": (orig(temperature=1e308), 400),
        "repetition_penalty zero": (orig(repetition_penalty=0), 400),
        "repetition_penalty negative": (orig(repetition_penalty=-1.2), 400),
        "english string": (orig(english="yes"), 400),
        "prompt over max_length": (orig(text="描述这张图片。" * 20, max_length=60), 400),
        "prompt over the context": (orig(text="描述这张图片。" * 3000), 400),
        "prompt absurdly long": (orig(text=big_text), 400),
        "GET /": (("GET", "/", {}), 405),
        "PUT /": (("PUT", "/", {"json": ok}), 405),
        "unknown path": (("POST", "/v2/generate", {"json": ok}), 404),
        "unknown model": (("GET", "/v1/models/gpt-4", {}), 404),
        "GET completions": (("GET", "/v1/chat/completions", {}), 405),
        # -- OpenAI
        "oa malformed json": raw("/v1/chat/completions", b"{'messages': []}"),
        "oa no messages": (("POST", "/v1/chat/completions", {"json": {"model": "x"}}), 400),
        "oa empty messages": msgs(),
        "oa messages string": (("POST", "/v1/chat/completions", {"json": {"messages": "hi"}}), 400),
        "oa message string": msgs("hi"),
        "oa bad role": msgs({"role": "robot", "content": "hi"}),
        "oa tool role": msgs({"role": "tool", "content": "hi", "tool_call_id": "1"}),
        "oa content missing": msgs({"role": "user"}),
        "oa content int": msgs({"role": "user", "content": 5}),
        "oa part string": msgs({"role": "user", "content": ["hi"]}),
        "oa part audio": msgs({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
        "oa part text int": msgs({"role": "user", "content": [{"type": "text", "text": 5}]}),
        "oa image no url": msgs({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}),
        "oa image path": img("/etc/passwd"),
        "oa image file url": img("file:///etc/passwd"),
        "oa image http not allowed": img("http://127.0.0.1:9/x.png"),
        "oa image bad base64": img("data:image/png;base64,@@@@"),
        "oa image not base64 data": img("data:image/png,rawbytes"),
        "oa image not an image": img("data:image/png;base64," + not_image),
        "oa image bomb": img("data:image/png;base64," + bomb),
        "oa image too large": img("data:image/png;base64," + huge, status=413),
        "oa two images": msgs({"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED_URL}},
                                                           {"type": "image_url", "image_url": {"url": BLUE_URL}},
                                                           {"type": "text", "text": "compare"}]}),
        "oa image from assistant": msgs({"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": [{"type": "image_url",
                                                                           "image_url": {"url": RED_URL}}]},
                                        {"role": "user", "content": "and?"}),
        "oa ends with assistant": msgs({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}),
        "oa assistant first": msgs({"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}),
        "oa system after user": msgs({"role": "user", "content": "hi"}, {"role": "system", "content": "x"}),
        "oa empty question": msgs({"role": "user", "content": "   "}),
        "oa max_tokens zero": oa(max_tokens=0),
        "oa max_tokens string": oa(max_tokens="10"),
        "oa max_tokens huge": oa(max_tokens=10 ** 6),
        "oa temperature 3": oa(temperature=3),
        "oa top_p 2": oa(top_p=2),
        "oa n 2": oa(n=2),
        "oa stream string": oa(stream="yes"),
        "oa stop five": oa(stop=["a", "b", "c", "d", "e"]),
        "oa stop empty": oa(stop=""),
        "oa stop int": oa(stop=5),
        "oa seed string": oa(seed="abc"),
        "oa logprobs": oa(logprobs=True),
        "oa tools": oa(tools=[{"type": "function", "function": {"name": "f"}}]),
        "oa json mode": oa(response_format={"type": "json_object"}),
        "oa stream_options string": oa(stream=True, stream_options="x"),
        "oa presence_penalty absurd": oa(presence_penalty=5),
        "oa prompt too long": oa(messages=[{"role": "user", "content": big_text}]),
    }
    return cases


BAD = _bad_requests()


def test_there_are_plenty_of_bad_requests():
    assert len(BAD) >= 60


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(client, engine, worker):
    before = dict(worker.stats)
    failures = []
    for name, ((method, path, kwargs), status) in BAD.items():
        r = client.request(method, path, **kwargs)
        try:
            body = r.json()
            ok = (r.status_code == status and isinstance(body["error"]["message"], str) and body["error"]["message"]
                  and isinstance(body["error"]["type"], str) and body["status"] == status)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert worker.stats["requests"] == before["requests"], "a bad request reached the model"
    # the server is fine afterwards
    good = client.post("/", json={"text": "描述这张图片。", "image": RED_B64, "max_length": 70, "top_k": 1})
    assert good.status_code == 200
    assert good.json()["response"] == reference(engine, "描述这张图片。", RED, max_length=70, top_k=1)
    assert client.get("/health").status_code == 200


def test_error_messages_say_what_is_wrong(client):
    too_long = client.post("/", json={"text": "描述这张图片。" * 20, "max_length": 60}).json()["error"]
    assert too_long["type"] == "context_length_exceeded" and "max_length" in too_long["message"]
    bomb = base64.b64encode(png_bytes(Image.new("1", (6000, 6000)))).decode()
    assert "pixels" in client.post("/", json={"text": "hi", "image": bomb}).json()["error"]["message"]
    remote = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}).json()["error"]
    assert "--allow-remote-images" in remote["message"]


def test_img_tags_in_user_text_are_plain_text(client, engine, worker, canary, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(RED_PNG)
    encoded = worker.stats["images_encoded"]
    for tag in (f"<img>{canary.url}/leak.png</img>", f"<img>{secret}</img>", "<img>/etc/passwd</img>"):
        query = f"{tag}描述这张图片。"
        r = client.post("/", json={"text": query, "max_length": 200, "top_k": 1})
        assert r.status_code == 200, r.text
        assert r.json()["response"] == reference(engine, query, max_length=200, top_k=1)
        o = client.post("/v1/chat/completions", json=chat_body(query, max_tokens=3))
        assert o.json()["usage"]["prompt_tokens"] == prompt_tokens(engine, query, False)   # no image slots
    assert canary.hits == [] and worker.stats["images_encoded"] == encoded


def test_remote_image_urls_only_when_the_operator_allows(worker, engine, canary):
    allowed = LiveServer(create_app(worker, allow_remote_images=True, allow_private_image_hosts=True))
    public_only = LiveServer(create_app(worker, allow_remote_images=True))
    try:
        expected = reference(engine, "描述这张图片。", RED, max_length=2048, max_new_tokens=6, temperature=0)
        for path in ("/img.png", "/redirect"):
            body = chat_body([{"type": "text", "text": "描述这张图片。"},
                              {"type": "image_url", "image_url": {"url": canary.url + path}}], max_tokens=6)
            r = httpx.post(allowed.url + "/v1/chat/completions", json=body, timeout=60, trust_env=False)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected
        r = httpx.post(allowed.url + "/", json={"text": "描述这张图片。", "image": canary.url + "/img.png",
                                                "max_length": 200, "top_k": 1}, timeout=60, trust_env=False)
        assert r.status_code == 200
        hits = len(canary.hits)
        r = httpx.post(public_only.url + "/v1/chat/completions", json=body, timeout=60, trust_env=False)
        assert r.status_code == 400 and "public" in r.json()["error"]["message"]
        assert len(canary.hits) == hits, "a private address was fetched"
    finally:
        allowed.close()
        public_only.close()
    assert worker.started and worker.ready, "apps that did not start the worker must not stop it"


# -- concurrency -------------------------------------------------------------------------------------------------
QUESTIONS = ["描述这张图片。", "What colour is the background?", "图中有什么？", "How many shapes are there?",
             "有几个形状？", "Is there a star?", "这张图片的背景是什么颜色？", "Describe the image."]


def concurrent_bodies():
    bodies = []
    for i in range(16):
        q = QUESTIONS[i % len(QUESTIONS)]
        if i % 3 == 0:
            content = q
        else:
            url = RED_URL if i % 2 else BLUE_URL
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
        bodies.append(chat_body(content, max_tokens=6 + i % 5))
    return bodies


def test_16_concurrent_clients_get_their_sequential_answers(client, api, worker):
    bodies = concurrent_bodies()
    sequential = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"]
                  for b in bodies]
    calls = worker.stats["generate_calls"]

    async def everyone():
        async with httpx.AsyncClient(base_url=api.url, timeout=120, trust_env=False) as ac:
            async def one(body):
                r = await ac.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]
            return await asyncio.gather(*(one(b) for b in bodies))
    together = asyncio.run(everyone())
    assert together == sequential
    used = worker.stats["generate_calls"] - calls
    assert used < len(bodies) / 2, f"16 concurrent requests took {used} generate() calls: no batching"
    assert worker.stats["max_batch_seen"] > 1


def wait_for(predicate, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_health_answers_during_generation_and_a_disconnect_frees_the_row(api, worker):
    cancelled = worker.stats["cancelled"]
    with httpx.Client(base_url=api.url, timeout=60, trust_env=False) as c:
        with c.stream("POST", "/v1/chat/completions", json=LONG) as s:
            lines = s.iter_lines()     # keep it: dropping the iterator would close the connection
            read_tokens(lines, 3)
            assert worker.running == 1
            t = time.monotonic()
            h = httpx.get(api.url + "/health", timeout=5, trust_env=False)
            assert h.status_code == 200 and h.json()["running"] == 1
            assert time.monotonic() - t < 1.0, "/health was held up by generation"
        # leaving the block closes the connection mid-stream
    wait_for(lambda: worker.running == 0, 5, "the abandoned row to stop")
    assert worker.stats["cancelled"] == cancelled + 1


def test_full_queue_answers_503_and_disconnects_free_places(engine):
    worker = Worker(engine, max_batch=1, max_queue=1, batch_wait=0.0).start()
    server = LiveServer(create_app(worker))
    results = {}

    def post(name, body, timeout):
        try:
            results[name] = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout, trust_env=False)
        except httpx.TimeoutException as e:
            results[name] = e
    try:
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
            with c.stream("POST", "/v1/chat/completions", json=LONG) as a:
                lines = a.iter_lines()
                read_tokens(lines, 1)
                assert worker.running == 1
                # b waits in the queue, then gives up (client timeout: the connection closes)
                b = threading.Thread(target=post, args=("b", chat_body("Hello", max_tokens=4), 1.5))
                b.start()
                wait_for(lambda: worker.queued == 1, 5, "b to queue")
                full = c.post("/v1/chat/completions", json=chat_body("Hello", max_tokens=4))
                assert full.status_code == 503 and full.json()["error"]["type"] == "server_overloaded"
                assert full.headers.get("retry-after")
                b.join()
                assert isinstance(results["b"], httpx.TimeoutException)
                wait_for(lambda: worker.queued == 0, 5, "b's place to be freed")
                d = threading.Thread(target=post, args=("d", chat_body("Hello", max_tokens=4), 60))
                d.start()                                         # accepted: b's place is free again
                wait_for(lambda: worker.queued == 1 or "d" in results, 5, "d to queue")
            # a's client leaves: its row stops, d runs
            d.join(30)
        assert results["d"].status_code == 200 and results["d"].json()["choices"][0]["message"]["content"] is not None
        assert worker.stats["rejected"] == 1 and worker.stats["cancelled"] >= 2
    finally:
        server.close()
        worker.stop()


def test_health_is_503_while_loading_and_the_api_key_is_checked(engine):
    gate = threading.Event()

    def loader():
        gate.wait(30)
        return engine
    server = LiveServer(create_app(loader, api_key="sekrit", batch_wait=0.0))
    key = {"Authorization": "Bearer sekrit"}
    try:
        h = httpx.get(server.url + "/health", trust_env=False)
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = httpx.post(server.url + "/", json={"text": "hi"}, headers=key, trust_env=False)
        assert r.status_code == 503 and r.json()["error"]["type"] == "model_not_ready"
        gate.set()
        wait_for(lambda: httpx.get(server.url + "/health", trust_env=False).status_code == 200, 10, "loading")
        r = httpx.post(server.url + "/", json={"text": "hi", "max_length": 30}, trust_env=False)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(server.url + "/", json={"text": "hi", "max_length": 30}, headers=key, timeout=60, trust_env=False)
        assert r.status_code == 200
    finally:
        gate.set()
        server.close()


# -- the command line --------------------------------------------------------------------------------------------
def test_api_py_serves_a_checkpoint_and_exits_on_a_missing_one(ckpt_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "api.log", "w")
    proc = subprocess.Popen([sys.executable, "api.py", "--from_pretrained", str(ckpt_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--max-batch", "4"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < end, "api.py did not become healthy"
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(url + "/", json={"text": "描述这张图片。", "image": RED_B64, "max_length": 60}, timeout=60,
                       trust_env=False)
        assert r.status_code == 200 and r.json()["status"] == 200
        assert httpx.get(url + "/v1/models", trust_env=False).json()["data"][0]["id"] == Path(ckpt_dir).name
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit status -15)
    assert proc.returncode in (0, -15) and "Application shutdown complete" in (tmp_path / "api.log").read_text()

    missing = subprocess.run([sys.executable, "api.py", "--from_pretrained", str(tmp_path / "nothing-here"),
                              "--host", "127.0.0.1", "--port", str(free_port()), "--device", "cpu"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "could not load the model" in missing.stderr
    # said once, clearly: no traceback, the reason not repeated by a log line
    assert "Traceback" not in missing.stderr and missing.stderr.count("not found") == 1, missing.stderr
    assert [line for line in missing.stderr.splitlines() if "not found" in line][0].startswith(
        "error: could not load the model: Checkpoint")


# -- hostile clients ---------------------------------------------------------------------------------------------
def eight_together(engine, odd_body):
    """Seven greedy requests and `odd_body`, sent at once to a server whose worker batches up to eight:
    -> (the seven answers when run one by one, the eight responses together, the worker)."""
    worker = Worker(engine, max_batch=8, max_queue=16, batch_wait=2.0).start()
    server = LiveServer(create_app(worker))
    bodies = concurrent_bodies()[:7]
    try:
        with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as c:
            alone = [c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"]
                     for b in bodies]
        calls = worker.stats["generate_calls"]

        async def everyone():
            async with httpx.AsyncClient(base_url=server.url, timeout=120, trust_env=False) as ac:
                return await asyncio.gather(*(ac.post("/v1/chat/completions", json=b)
                                              for b in bodies[:3] + [odd_body] + bodies[3:]))
        together = asyncio.run(everyone())
        assert worker.stats["generate_calls"] - calls == 1, "the eight requests should share one batch"
    finally:
        server.close()
        worker.stop()
    return alone, together[:3] + together[4:], together[3], worker


def test_a_request_with_an_extreme_penalty_does_not_fail_its_batch(engine):
    # repetition_penalty 1e-300 is in the accepted range (> 0); with temperature 1 it used to make the
    # sampling divisor 0 in fp32, and the NaN it gave failed every request of the batch with a 500
    odd = chat_body("描述这张图片。", max_tokens=12, temperature=1, repetition_penalty=1e-300)
    alone, together, odd_response, worker = eight_together(engine, odd)
    for expected, r in zip(alone, together):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
    assert odd_response.status_code == 200, odd_response.text
    assert odd_response.json()["usage"]["completion_tokens"] >= 1
    assert worker.stats["errors"] == 0


def test_a_row_that_fails_gets_its_own_json_error_and_the_others_complete(engine, monkeypatch):
    marker = 0.31337                      # the temperature of the request made to fail
    fail_rows(monkeypatch, temperature_is(marker), at_step=2)
    alone, together, failed, worker = eight_together(engine, chat_body("描述这张图片。", max_tokens=20,
                                                                       temperature=marker))
    for expected, r in zip(alone, together):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
    error = failed.json()
    assert error["status"] == 500 and error["error"]["type"] == "generation_error"
    assert "NaN" in error["error"]["message"] and "ExceptionGroup" not in error["error"]["message"]
    assert worker.stats["errors"] == 1

    # streamed, the failing row ends with an error event and then [DONE]
    worker = Worker(engine, batch_wait=0.0).start()
    server = LiveServer(create_app(worker))
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, trust_env=False,
                          json=chat_body("Describe the image.", max_tokens=20, temperature=marker, stream=True)) as s:
            assert s.status_code == 200
            events = sse_events(s.iter_lines())
    finally:
        server.close()
        worker.stop()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["status"] == 500 and last["error"]["type"] == "generation_error"
    assert sum(1 for e in events[:-2] if json.loads(e)["choices"][0]["delta"].get("content")) >= 1


def test_keep_alive_connections_survive_error_answers(api, engine, worker, monkeypatch):
    """Errors are answered as JSON on a connection that stays usable. An exception that escaped to the
    server (e.g. an ExceptionGroup from anyio's task group) used to make uvicorn drop the connection
    after answering, without `Connection: close`, so the client's next request on it was reset."""
    good = json.dumps(chat_body("Hello, who are you?", max_tokens=4)).encode()
    headers = {"Content-Type": "application/json"}
    real_prepare = worker.prepare

    def broken_prepare(*args, **kwargs):
        raise RuntimeError("something nobody expected")
    host, port = api.url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(path, body):
        conn.request("POST", path, headers=headers, body=body)
        r = conn.getresponse()
        return r, json.loads(r.read())
    try:
        monkeypatch.setattr(worker, "prepare", broken_prepare)       # an unexpected error
        r, body = post("/v1/chat/completions", good)
        assert r.status == 500 and body["error"]["type"] == "internal_error", body
        assert "RuntimeError" in body["error"]["message"]
        assert (r.getheader("connection") or "").lower() != "close"
        sock = conn.sock
        monkeypatch.setattr(worker, "prepare", real_prepare)
        r, body = post("/v1/chat/completions", good)                 # used to be reset
        assert r.status == 200 and body["choices"][0]["message"]["content"] is not None

        fail_rows(monkeypatch, temperature_is(0.4242))               # generation fails
        r, body = post("/v1/chat/completions", json.dumps(chat_body("Hello", max_tokens=4, temperature=0.4242)))
        assert r.status == 500 and body["error"]["type"] == "generation_error", body
        r, body = post("/", json.dumps({"text": "hi", "max_length": 30, "temperature": 0.4242}))
        assert r.status == 500 and body["error"]["type"] == "generation_error", body
        r, body = post("/", json.dumps({"text": "hi", "max_length": 30, "top_k": 1}))
        assert r.status == 200 and body["status"] == 200
        assert conn.sock is sock, "the connection was closed and reopened"
    finally:
        conn.close()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_leaving_during_the_upload_is_one_log_line(api, client, worker):
    """A client that disconnects mid-body (or sends broken chunked encoding) is a normal event: one
    line in the log, no traceback, no 500 attempted, and the server goes on."""
    records = Records()
    loggers = [logging.getLogger("visualglm.serving"), logging.getLogger("uvicorn.error")]
    level = loggers[0].level
    loggers[0].setLevel(logging.INFO)
    for lg in loggers:
        lg.addHandler(records)
    host, port = api.url.rsplit("/", 1)[1].split(":")
    requests = worker.stats["requests"]

    def traceback_logged():
        return [r.getMessage() for r in records.records if r.exc_info or r.levelno >= logging.ERROR]
    try:
        for path in ("/v1/chat/completions", "/"):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100000\r\n\r\n".encode() + b'{"text": "')   # 10 of 100000 bytes
                time.sleep(0.2)
            wait_for(lambda: traceback_logged() or any("disconnected" in r.getMessage() for r in records.records),
                     10, "the disconnect to be logged")
            time.sleep(0.2)
            assert not traceback_logged()
            gone = [r for r in records.records if "disconnected" in r.getMessage()]
            assert len(gone) == 1 and gone[0].levelno <= logging.WARNING and "10 of 100000" in gone[0].getMessage()
            records.records = []
        # a body with broken chunked encoding: the server answers 400 and closes
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"tex\r\nzz\r\n".encode())
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400")
        time.sleep(0.5)
        assert client.post("/", json={"text": "hi", "max_length": 30, "top_k": 1}).status_code == 200
    finally:
        for lg in loggers:
            lg.removeHandler(records)
        loggers[0].setLevel(level)
    assert not traceback_logged()
    assert worker.stats["requests"] == requests + 1


def test_post_endpoints_require_a_json_content_type(client, worker):
    """A JSON body sent as text/plain (or form data) is what any web page can make a browser send
    without a CORS preflight: refused with 415 before anything is read."""
    requests = worker.stats["requests"]
    original = json.dumps({"text": "hi", "max_length": 30, "top_k": 1})
    openai = json.dumps(chat_body("hi", max_tokens=3))
    for path, body in (("/", original), ("/v1/chat/completions", openai)):
        for ctype in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = client.post(path, content=body, headers=headers)
            assert r.status_code == 415, (path, ctype, r.status_code, r.text)
            assert r.json()["error"]["type"] == "unsupported_media_type" and r.json()["status"] == 415
            assert "application/json" in r.json()["error"]["message"]
    assert worker.stats["requests"] == requests
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                  "application/vnd.api+json"):
        r = client.post("/", content=original, headers={"Content-Type": ctype})
        assert r.status_code == 200, (ctype, r.text)


def test_a_trailing_slash_is_not_redirected(client):
    # FastAPI used to answer a bodyless 307 whose Location came from the client's Host header
    for method, path in (("POST", "/v1/chat/completions/"), ("GET", "/health/"), ("GET", "/v1/models/")):
        r = client.request(method, path, json=chat_body("hi", max_tokens=3) if method == "POST" else None,
                           headers={"Host": "evil.example"})
        assert r.status_code == 404, (path, r.status_code, r.headers)
        assert "location" not in r.headers and r.json()["error"]["type"] == "not_found"
