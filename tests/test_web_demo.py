"""The Gradio web demo in a real browser: Playwright drives Debian's headless Chromium against a live
`web_demo.py` with the tiny model. Friendly notices, image upload, a streamed answer, a second turn,
Clear. Skipped (with the reason) only where Playwright or Chromium is not installed."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the Playwright Python package is not installed (pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's browser (apt-get install chromium) to run the "
                f"browser test", allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(ckpt_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("web") / "web_demo.log"
    log = open(log_path, "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.Popen([sys.executable, "web_demo.py", "--from_pretrained", str(ckpt_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < end, "web_demo.py did not come up:\n" + log_path.read_text()
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def page(demo_url, tmp_path):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(30_000)
        pg.goto(demo_url)
        pg.wait_for_selector("#query textarea")
        try:
            yield pg
        finally:
            pg.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
            browser.close()


def bot_texts(page):
    return [m.inner_text() for m in page.locator("#chatbot [data-testid='bot']").all()]


def user_texts(page):
    return [m.inner_text() for m in page.locator("#chatbot [data-testid='user']").all()]


def toasts(page):
    return " ".join(t.inner_text() for t in page.locator(".toast-body").all())


def watch_answer(page, index, timeout=60.0):
    """Poll bot message `index` until it stops changing; return every distinct text seen on the way."""
    seen, last_change, end = [], time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        texts = bot_texts(page)
        now = texts[index] if len(texts) > index else ""
        if not seen or now != seen[-1]:
            seen.append(now)
            last_change = time.monotonic()
        elif now and time.monotonic() - last_change > 2.0:
            return seen
        page.wait_for_timeout(40)
    raise AssertionError(f"the answer did not settle; seen: {seen[-3:]}")


def test_upload_ask_stream_follow_up_and_clear(page, image_file):
    query = page.locator("#query textarea")

    # friendly notices instead of errors
    query.fill("What is in the picture?")
    page.locator("#send").click()
    page.wait_for_function("() => document.body.innerText.includes('Please upload an image first')")
    assert bot_texts(page) == []
    query.fill("这是什么？")
    page.locator("#send").click()
    page.wait_for_function("() => document.body.innerText.includes('请先上传一张图片')")

    # a short maximum length keeps the tiny model's answer to a few seconds
    length = page.locator("#max_length input[type=number]")
    length.fill("160")
    length.press("Enter")
    page.locator("#image input[type=file]").set_input_files(str(image_file))
    page.wait_for_selector("#image img")

    query.fill("")
    page.locator("#send").click()
    page.wait_for_function("() => document.body.innerText.includes('Please type a question')")

    query.fill("描述这张图片。")
    page.locator("#send").click()
    seen = watch_answer(page, 0)
    growing = [t for t in seen if t]
    assert len(growing) >= 3, f"the answer did not stream: {[len(t) for t in seen]}"
    assert all(len(a) <= len(b) for a, b in zip(growing, growing[1:]))
    assert user_texts(page) == ["描述这张图片。"] and bot_texts(page)[0]

    # a follow-up question with Enter: the conversation goes on (the first answer fills the first
    # maximum length: too long a conversation is refused with a notice until the limit is raised)
    query.fill("What colour is the background?")
    query.press("Enter")
    page.wait_for_function("() => document.body.innerText.includes('The conversation is too long')")
    length.fill("600")
    length.press("Enter")
    query.fill("What colour is the background?")
    query.press("Enter")
    watch_answer(page, 1)
    assert user_texts(page) == ["描述这张图片。", "What colour is the background?"] and len(bot_texts(page)) == 2
    assert query.input_value() == ""

    # Stop ends a long answer where it is; the conversation keeps what was shown
    length.fill("2048")
    length.press("Enter")
    query.fill("图中有什么？")
    page.locator("#send").click()
    page.wait_for_function("() => document.querySelectorAll(\"#chatbot [data-testid='bot']\").length == 3 && "
                           "document.querySelectorAll(\"#chatbot [data-testid='bot']\")[2].innerText.length > 20")
    page.locator("#stop").click()
    stopped = watch_answer(page, 2, timeout=20)[-1]
    page.wait_for_timeout(1500)
    assert bot_texts(page)[2] == stopped, "the answer kept growing after Stop"

    page.locator("#clear").click()
    page.wait_for_function("() => !document.querySelector(\"#chatbot [data-testid='user']\")")
    page.wait_for_function("() => !document.querySelector('#image img')")
    assert bot_texts(page) == [] and user_texts(page) == []
