"""The HTTP API decodes only raster images: EPS (which Pillow would hand to Ghostscript) and other
non-raster bytes sent as the original contract's base64 `image` or as an OpenAI data: URL get a 400
that says what is wrong, without Pillow ever trying a non-raster plugin, and the model never sees them."""
import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.chat import ChatEngine
from serving import Worker
from serving.app import create_app

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
ACCEPTED = "not a PNG, JPEG, WebP, GIF, BMP or TIFF image"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    return buf.getvalue()


def original(data: bytes) -> dict:
    return {"text": "描述这张图片。", "image": b64(data), "max_length": 80, "top_k": 1}


def openai(data: bytes, media: str = "image/png") -> dict:
    url = f"data:{media};base64,{b64(data)}"
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the image."},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def worker(tiny):
    model, tok = tiny
    w = Worker(ChatEngine(model, tok, allow_image_paths=False, allow_image_urls=False), max_batch=2,
               max_queue=4).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def client(worker):
    with TestClient(create_app(worker, model_name="visualglm-test")) as c:
        yield c




def assert_refused(r, expected: str):
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["status"] == 400 and body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert expected in message and "object at 0x" not in message and "<_io." not in message, message


@pytest.mark.parametrize("path, body", [("/", original), ("/v1/chat/completions", openai),
                                        ("/v1/chat/completions", lambda data: openai(data, "image/x-eps"))],
                         ids=["original", "openai", "openai-eps-media-type"])
def test_eps_is_refused_with_400_before_the_eps_plugin(client, worker, eps_plugin, path, body):
    before = worker.stats["requests"]
    assert_refused(client.post(path, json=body(EPS)), ACCEPTED)
    assert eps_plugin == [], "Pillow's EPS plugin saw the client's bytes"
    assert worker.stats["requests"] == before
    # the same route still takes a PNG: the 400 comes from the format check, not from images being refused
    r = client.post(path, json=body(png()))
    assert r.status_code == 200 and worker.stats["requests"] == before + 1, r.text


def test_damaged_images_say_what_is_wrong(client, eps_plugin):
    good = png()
    for data, expected in ((b"hello, this is not an image", ACCEPTED),
                           (good[:40], "truncated or corrupt PNG image"),
                           (good[:-30], "truncated or corrupt")):
        assert_refused(client.post("/", json=original(data)), expected)
        assert_refused(client.post("/v1/chat/completions", json=openai(data)), expected)
    assert eps_plugin == []

