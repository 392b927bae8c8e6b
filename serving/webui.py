"""The Gradio (6.x) web demo, built on a Worker so that concurrent visitors are batched together.

    demo = build_demo(worker)            # web_demo.py (sat) and web_demo_hf.py share this
    demo.queue().launch(...)

One conversation is about one image: uploading another image (or Clear) starts a new conversation.
Gradio never decodes the upload: the image box hands over the file Gradio saved, and model.image reads
it (raster formats only, as everywhere else).
Answers stream into the chat; the language of the prompt template and of the notices follows the
user's text (Chinese when it contains Han characters).
"""
import base64
import binascii
import sys
from pathlib import Path
from typing import List, Optional, Tuple, Union

import anyio

from model.prompts import PromptTooLongError, has_chinese
from model.sampling import SamplingParams
from model.defaults import DEMO_SAMPLING, MAX_IMAGE_BYTES
from model.image import ImageLoadError, load_image

from .errors import NotReadyError, QueueFullError, ServingError
from .text import TextAssembler
from .worker import Worker

DEFAULTS = DEMO_SAMPLING

NOTICES = {
    "empty": ("请输入问题。", "Please type a question."),
    "no_image": ("请先上传一张图片，再提问。", "Please upload an image first, then ask about it."),
    "bad_image": ("这张图片无法读取，请换一张。", "Please upload another image."),
    "upload_gone": ("图片已过期，请重新上传。", "The uploaded image has expired; please upload it again."),
    "too_long": ("对话太长，超出了模型的长度上限：请点击“清除”重新开始，或调大最大长度。",
                 "The conversation is too long for the model: press Clear to start over, or raise the maximum length."),
    "busy": ("服务繁忙，请稍后再试。", "The server is busy; please try again in a moment."),
    "loading": ("模型还在加载，请稍后再试。", "The model is still loading; please try again shortly."),
    "failed": ("生成出错：", "Generation failed: "),
}
INTRO = ("**{title}**: upload an image, then ask questions about it (Chinese or English). "
         "上传图片后即可就图片内容提问（中文或英文）。新图片或“清除”会开始新的对话。")
SHARE_HINT = "* To create a public link, add --share to the command."


def notice(key: str, chinese: bool) -> str:
    zh, en = NOTICES[key]
    return zh if chinese else en


def messages_of(history) -> list:
    out = []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def read_upload(source: Union[str, bytes]):
    """The visitor's image as RGB, decoded by model.image: a file in Gradio's upload folder (the path
    comes from upload_image_box's preprocess) or the bytes of a data: URL."""
    if isinstance(source, str):
        path = Path(source)
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageLoadError(f"The image is over the limit of {MAX_IMAGE_BYTES} bytes.")
        source = path.read_bytes()   # as bytes, so that messages say "The image" and not a temp path
    return load_image(source, allow_path=False, allow_url=False)


def upload_image_box(**kw):
    """A gr.Image whose input Gradio does not decode. Gradio 6's own preprocessing calls PIL.Image.open on
    the upload with every Pillow plugin, for type="filepath" too, and decodes data: URLs in full, which
    would let a visitor's EPS reach Ghostscript. This box hands read_upload the file Gradio has already
    checked into its upload folder (or a data: URL's bytes) without opening it. The method is replaced
    on the instance: a gr.Image subclass would make Gradio write a .pyi file beside this module."""
    import gradio as gr
    from gradio.utils import is_in_or_equal

    box = gr.Image(type="filepath", **kw)

    def preprocess(payload) -> Optional[Union[str, bytes]]:
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            try:
                return base64.b64decode(payload.url.partition(",")[2], validate=True)
            except (binascii.Error, ValueError):
                raise gr.Error("The image is not valid base64.") from None
        if not payload.path or not is_in_or_equal(payload.path, box.GRADIO_CACHE):
            raise gr.Error("The image was not uploaded to this app.")
        return payload.path

    box.preprocess = preprocess
    return box


class _Refused(Exception):
    """A question that is not sent to the model: the notice (its message) tells the visitor why."""


def new_conversation():
    return [], []


def _turn(chat: list, history: list, query: str, answer: str):
    """The outputs while `answer` streams in: chat messages, history pairs, an emptied text box. The
    partial answer is kept in the history too, so that Stop leaves both in agreement."""
    messages = chat + [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return messages, history + [(query, answer)], ""


class ChatHandler:
    """The demo's `respond`: one per demo, holding the worker and the sampling defaults (top_k and
    repetition_penalty, which have no slider)."""

    def __init__(self, worker: Worker, defaults: dict):
        self.worker = worker
        self.defaults = defaults

    async def respond(self, query: str, image, history: List[Tuple[str, str]], max_length, top_p, temperature):
        """Yields (chat messages, history pairs, text box value). The history pairs are the truth; the
        chat messages are drawn from them."""
        import gradio as gr

        query = (query or "").strip()
        history = [tuple(pair) for pair in (history or [])]
        chat = messages_of(history)
        chinese = has_chinese(query)
        try:
            stream = await self._start(query, image, history, chinese, max_length, top_p, temperature)
        except _Refused as e:
            gr.Warning(str(e))
            yield chat, history, query
            return

        try:
            # inside the try: a Stop (or Clear) that closes this generator at the first, empty output
            # must cancel the stream too, or its row keeps generating for nobody
            yield _turn(chat, history, query, "")
            text = TextAssembler(self.worker.engine.streaming_decode())
            async for ids in stream:
                if text.add(ids):
                    yield _turn(chat, history, query, text.text)
            text.finish()
            yield _turn(chat, history, query, text.text)
        except ServingError as e:
            text.finish()
            messages, pairs, _ = _turn(chat, history, query, text.text)
            messages[-1] = {"role": "assistant", "content": f"{text.text}\n\n⚠️ {notice('failed', chinese)}{e}"}
            yield messages, pairs, ""
        finally:
            stream.cancel()        # the visitor pressed Stop / Clear or left: free the batch row

    async def _start(self, query, image, history, chinese: bool, max_length, top_p, temperature):
        """The queued Stream for this question, or _Refused with the notice to show instead."""
        if not query:
            raise _Refused(f"{NOTICES['empty'][0]} / {NOTICES['empty'][1]}")
        if image is None:
            raise _Refused(notice("no_image", chinese))
        image = await self._read(image, chinese)
        d = self.defaults
        try:
            params = SamplingParams(max_length=int(max_length), top_p=float(top_p), temperature=float(temperature),
                                    top_k=int(d["top_k"]), repetition_penalty=float(d["repetition_penalty"]))
            job = await anyio.to_thread.run_sync(self.worker.prepare, query, history, image, not chinese, params)
            return self.worker.submit(job)
        except PromptTooLongError:
            raise _Refused(notice("too_long", chinese)) from None
        except QueueFullError:
            raise _Refused(notice("busy", chinese)) from None
        except NotReadyError:
            raise _Refused(notice("loading", chinese)) from None
        except (ServingError, ValueError) as e:
            raise _Refused(notice("failed", chinese) + str(e)) from None

    @staticmethod
    async def _read(image, chinese: bool):
        try:
            return await anyio.to_thread.run_sync(read_upload, image)
        except ImageLoadError as e:
            raise _Refused(f"{notice('bad_image', chinese)} {e}") from None
        except OSError:          # Gradio deletes uploads after an hour (delete_cache in build_demo)
            raise _Refused(notice("upload_gone", chinese)) from None


def _settings(worker: Worker, d: dict):
    """The left column: the image box and the sampling sliders."""
    import gradio as gr

    image = upload_image_box(label="Image / 图片", elem_id="image", height=320)
    max_length = gr.Slider(64, max(worker.max_context, 64), value=min(d["max_length"], worker.max_context),
                           step=1, label="Maximum length / 最大长度", elem_id="max_length")
    top_p = gr.Slider(0.0, 1.0, value=d["top_p"], step=0.01, label="Top P", elem_id="top_p")
    temperature = gr.Slider(0.0, 2.0, value=d["temperature"], step=0.01, label="Temperature / 温度",
                            elem_id="temperature")
    return image, max_length, top_p, temperature


def build_demo(worker: Worker, *, title: str = "VisualGLM-6B", defaults: Optional[dict] = None):
    import gradio as gr

    d = dict(DEFAULTS, **(defaults or {}))
    respond = ChatHandler(worker, d).respond

    # Gradio keeps uploads in its cache folder: delete them after an hour (checked every 10 minutes)
    with gr.Blocks(title=title, delete_cache=(600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(title=title))
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                image, max_length, top_p, temperature = _settings(worker, d)
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label=title, elem_id="chatbot", height=460)
                query = gr.Textbox(show_label=False, placeholder="Ask about the image… / 就图片提问…", lines=1, max_lines=6,
                                   elem_id="query")
                with gr.Row():
                    send = gr.Button("Send / 发送", variant="primary", elem_id="send")
                    stop = gr.Button("Stop / 停止", elem_id="stop")
                    clear = gr.Button("Clear / 清除", elem_id="clear")

        inputs = [query, image, history, max_length, top_p, temperature]
        outputs = [chatbot, history, query]
        limit = dict(concurrency_limit=worker.max_batch, concurrency_id="chat")
        sent = send.click(respond, inputs, outputs, **limit)
        submitted = query.submit(respond, inputs, outputs, **limit)
        stop.click(None, None, None, cancels=[sent, submitted])
        clear.click(lambda: (None, [], [], ""), None, [image, chatbot, history, query], cancels=[sent, submitted])
        image.upload(new_conversation, None, [chatbot, history], cancels=[sent, submitted])
        image.clear(new_conversation, None, [chatbot, history], cancels=[sent, submitted])
        chatbot.clear(new_conversation, None, [chatbot, history], cancels=[sent, submitted])
    return demo


def launch(demo, worker: Worker, *, host: str = "0.0.0.0", port: int = 7860, share: bool = False, **kw):
    """Serve until interrupted. Gradio's own start-up lines are replaced by ours: its hint "set
    `share=True` in `launch()`" speaks to programmers, while users of web_demo.py have --share."""
    demo.queue(max_size=max(worker.max_batch + worker.max_queue, 1))
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, show_error=True, quiet=True,
                prevent_thread_lock=True, **kw)
    print(f"* Running on local URL:  {demo.protocol}://{demo.server_name}:{demo.server_port}")
    if not share:                      # (with --share Gradio prints the public URL itself)
        print(SHARE_HINT)
    sys.stdout.flush()
    demo.block_thread()
