"""The Gradio web demo in a real browser: Playwright drives Debian's headless Chromium against a live
`web_demo.py` with the tiny model. Friendly notices, image upload, a streamed answer, a second turn,
Clear. Skipped (with the reason) only where Playwright or Chromium is not installed. Also, without a
browser: the image box never lets Gradio decode an upload; model.image does (raster formats only)."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, serve_until_ready, stop_process

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_api():
    """Playwright's sync API, or a skip: checked per browser test so that the tests without a browser
    in this file still run."""
    api = pytest.importorskip(
        "playwright.sync_api", reason="the Playwright Python package is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's browser (apt-get install chromium) to run the "
                    f"browser test")
    return api


@pytest.fixture(scope="module")
def demo_url(ckpt_dir, tmp_path_factory):
    browser_api()           # skip before starting a server that no browser would visit
    port = free_port()
    log_path = tmp_path_factory.mktemp("web") / "web_demo.log"
    log = open(log_path, "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.Popen([sys.executable, "web_demo.py", "--from_pretrained", str(ckpt_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        serve_until_ready(proc, url, log=log_path.read_text)
        yield url
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def page(demo_url, tmp_path):
    with browser_api().sync_playwright() as p:
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


def record_answer(page, index):
    """Record in the page every text bot message `index` takes (recorded_answer reads them back): in the
    browser itself, since a Python poll of the DOM can miss a short answer's steps on a loaded machine
    (CI once saw only the empty and the final text)."""
    page.evaluate("""index => {
        const root = document.querySelector('#chatbot'), seen = window.__answer = [];
        const note = () => {
            const bots = root.querySelectorAll("[data-testid='bot']");
            const text = bots.length > index ? bots[index].innerText : "";
            if (seen[seen.length - 1] !== text) seen.push(text);
        };
        new MutationObserver(note).observe(root, {subtree: true, childList: true, characterData: true});
        note();
    }""", index)


def recorded_answer(page):
    return page.evaluate("() => window.__answer")


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
    record_answer(page, 0)
    page.locator("#send").click()
    watch_answer(page, 0)
    seen = recorded_answer(page)
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


# -- without a browser: what opens an uploaded image ----------------------------------------------------------
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
ACCEPTED = "not a PNG, JPEG, WebP, GIF, BMP or TIFF image"
RASTER = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class FakeWorker:
    """Just enough of serving.Worker for build_demo and respond: records the images it is given."""
    max_context, max_batch, max_queue = 256, 2, 4

    def __init__(self):
        self.images = []

    def prepare(self, query, history, image, english, params):
        self.images.append(image)
        return object()

    def submit(self, job):
        class Stream:
            def cancel(self):
                pass
        return Stream()


@pytest.fixture
def pillow_calls(monkeypatch):
    """The `formats` of every PIL.Image.open call, and any use of the EPS plugin (parser or Ghostscript)."""
    from PIL import EpsImagePlugin, Image
    calls = {"open": [], "eps": []}
    real_open = Image.open

    def recording_open(fp, mode="r", formats=None):
        calls["open"].append(formats)
        return real_open(fp, mode, formats)

    def parse(self):
        calls["eps"].append("EpsImageFile._open")
        raise SyntaxError("the EPS plugin was reached")

    def ghostscript(*args, **kwargs):
        calls["eps"].append("Ghostscript")
        raise OSError("Ghostscript was called")
    monkeypatch.setattr(Image, "open", recording_open)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", parse)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    return calls


@pytest.fixture
def upload_dir(monkeypatch, tmp_path):
    """Gradio's upload folder for the demo built in the test."""
    folder = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    (folder / "0123abcd").mkdir(parents=True)
    return folder


def send_upload(demo, path, query="What is in the picture?"):
    """Run the demo's respond handler through Gradio's own input processing, as an upload would; return
    its first output and the warnings shown."""
    import asyncio
    import warnings
    fn = next(f for f in demo.fns.values() if f.name == "respond")
    payload = {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    async def run():
        result = await demo.process_api(block_fn=fn, inputs=[query, payload, [], 200, 0.4, 0.8], state=None)
        if result.get("iterator") is not None:
            await result["iterator"].aclose()      # the rest of the answer is not needed
        return result["data"]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        data = asyncio.run(run())
    return data, [str(w.message) for w in shown]


def test_an_eps_upload_never_reaches_gradio_or_the_eps_plugin(upload_dir, pillow_calls):
    from serving.webui import build_demo
    worker = FakeWorker()
    eps = upload_dir / "0123abcd" / "photo.png"          # an upload's name says nothing about its bytes
    eps.write_bytes(EPS)
    (chat, _, query), _ = send_upload(build_demo(worker), eps)
    assert pillow_calls["eps"] == [], "Pillow's EPS plugin saw the upload"
    assert pillow_calls["open"] and all(tuple(f or ()) == RASTER for f in pillow_calls["open"]), pillow_calls["open"]
    assert chat == [] and query == "What is in the picture?" and worker.images == []


def test_an_eps_upload_gets_a_notice_saying_what_is_wrong(upload_dir, pillow_calls):
    from serving.webui import build_demo
    eps = upload_dir / "0123abcd" / "photo.png"
    eps.write_bytes(EPS)
    _, shown = send_upload(build_demo(FakeWorker()), eps)
    assert any(ACCEPTED in w and "Please upload another image" in w for w in shown), shown
    assert not any("object at 0x" in w or str(upload_dir) in w for w in shown), shown
    _, shown = send_upload(build_demo(FakeWorker()), eps, query="这是什么？")
    assert any("请换一张" in w and ACCEPTED in w for w in shown), shown


def test_a_png_upload_is_decoded_by_model_image(upload_dir, pillow_calls):
    from PIL import Image

    from serving.webui import build_demo
    worker = FakeWorker()
    png = upload_dir / "0123abcd" / "photo.png"
    Image.new("RGBA", (40, 30), (0, 128, 255, 255)).save(png)
    (chat, _, _), _ = send_upload(build_demo(worker), png)
    assert [m["role"] for m in chat] == ["user", "assistant"]
    [image] = worker.images
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((5, 5)) == (0, 128, 255)
    assert pillow_calls["open"] and all(tuple(f or ()) == RASTER for f in pillow_calls["open"]), pillow_calls["open"]


def test_the_image_box_opens_nothing_itself(upload_dir, tmp_path, pillow_calls):
    import base64

    import gradio as gr
    from gradio.data_classes import ImageData

    from serving.webui import build_demo
    demo = build_demo(FakeWorker())
    box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "image")
    assert box.get_block_name() == "image"          # the browser still draws Gradio's own image box
    inside = upload_dir / "0123abcd" / "a.png"
    inside.write_bytes(EPS)
    assert box.preprocess(ImageData(path=str(inside), orig_name="a.png")) == str(inside)
    outside = tmp_path / "elsewhere.png"             # only files Gradio put in its upload folder
    outside.write_bytes(EPS)
    with pytest.raises(gr.Error):
        box.preprocess(ImageData(path=str(outside)))
    url = "data:image/png;base64," + base64.b64encode(EPS).decode()
    assert box.preprocess(ImageData(url=url)) == EPS
    assert pillow_calls["open"] == [] and pillow_calls["eps"] == []
    from model.image import ImageLoadError
    from serving.webui import read_upload         # what respond decodes the box's value with
    with pytest.raises(ImageLoadError, match=ACCEPTED):
        read_upload(str(inside))
    assert pillow_calls["eps"] == []


# -- Stop at the first output, the title, the start-up lines, a model that cannot load --------------------
class RecordingWorker(FakeWorker):
    """FakeWorker whose streams record whether they were cancelled."""

    def __init__(self):
        super().__init__()
        self.cancelled = []

    def submit(self, job):
        worker = self

        class Stream:
            def cancel(self):
                worker.cancelled.append(self)
        self.cancelled.append("submitted")
        return Stream()


def test_stop_right_after_the_first_empty_output_cancels_the_generation(image_file):
    """Gradio closes the handler's generator when the visitor presses Stop; at the first output (the
    question with an empty answer) that must free the batch row like any later Stop."""
    import asyncio

    from serving.webui import DEFAULTS, ChatHandler
    worker = RecordingWorker()

    async def stop_at_first_output():
        answer = ChatHandler(worker, DEFAULTS).respond("What is it?", str(image_file), [], 200, 0.4, 0.8)
        chat, history, box = await answer.__anext__()
        assert chat[-1] == {"role": "assistant", "content": ""} and box == ""
        await answer.aclose()                      # what Gradio does on Stop
    asyncio.run(stop_at_first_output())
    assert len(worker.cancelled) == 2, "the stream was not cancelled"


def test_the_page_is_titled_after_the_model():
    from serving.webui import build_demo
    demo = build_demo(FakeWorker(), title="visualglm-tiny")
    texts = [getattr(b, "value", None) for b in demo.blocks.values()]
    assert demo.title == "visualglm-tiny"
    assert any(isinstance(t, str) and t.startswith("**visualglm-tiny**") for t in texts)
    assert not any(isinstance(t, str) and "VisualGLM-6B" in t for t in texts)
    chatbot = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "chatbot")
    assert chatbot.label == "visualglm-tiny"


def test_web_demo_passes_the_checkpoint_name_as_title(monkeypatch, tmp_path):
    import types

    import web_demo
    import serving.webui as webui
    shown = {}
    monkeypatch.setattr(webui, "launch", lambda demo, worker, **kw: shown.update(title=demo.title))
    args = web_demo.parse_args(["--from_pretrained", str(tmp_path / "my-finetune") + "/"])
    engine = types.SimpleNamespace(max_context=256, backend=None)   # all build_demo and the worker ask of it
    assert web_demo.serve(args, loader=lambda: engine) == 0
    assert shown["title"] == "my-finetune"


def test_start_up_names_the_share_flag_not_gradios_launch_argument(capfd):
    from serving.webui import build_demo, launch
    demo = build_demo(FakeWorker())
    demo.block_thread = lambda: None               # return instead of serving until Ctrl-C
    try:
        launch(demo, FakeWorker(), host="127.0.0.1", port=free_port())
    finally:
        demo.close()
    out = capfd.readouterr().out
    assert "* Running on local URL:  http://127.0.0.1:" in out
    assert "add --share" in out and "share=True" not in out and "launch()" not in out


def test_a_model_that_cannot_load_is_reported_once_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "web_demo.py", "--from_pretrained", str(tmp_path / "nothing-here"),
                           "--host", "127.0.0.1", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert "Traceback" not in output and output.count("not found") == 1, output
    assert done.stderr.startswith("error: could not load the model: Checkpoint") and done.stderr.count("\n") == 1
