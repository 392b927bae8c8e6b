"""ApiService: what every API endpoint shares, turning an HTTP request into Worker calls.

The routes only speak HTTP and the Worker never sees it: this object checks the key and the content
type, reads the body within its limit, parses it (large bodies off the event loop), prepares and queues
the generation, and runs it to the end for the non-streaming answers.
"""
import hmac
import logging
import time
from typing import Optional

import anyio
import torch
from fastapi import Request
from starlette.requests import ClientDisconnect

from model.prompts import PromptTooLongError

from .errors import AuthenticationError, BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from .images import ImageLimits, decode_image
from .protocol import ChatCall, loads
from .streaming import ClientGone
from .text import TextAssembler
from .worker import Stream, Worker

log = logging.getLogger("visualglm.serving")

_THREAD_PARSE_BYTES = 256 * 1024        # bodies larger than this are parsed off the event loop


def is_json(content_type: str) -> bool:
    """application/json or application/<anything>+json, with any parameters (charset...)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def check_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if not is_json(ctype):
        raise UnsupportedMediaTypeError(f"Send the request body as JSON with 'Content-Type: application/json' "
                                        f"(got {ctype or 'no Content-Type'!r}).")


class ApiService:
    """One app's worker, model name, limits and key. `decoders` bounds how many images are decoded at
    once (each may take a large buffer); `created` is the model's creation time for /v1/models."""

    def __init__(self, worker: Worker, *, model_name: str, limits: ImageLimits, body_limit: int,
                 api_key: Optional[str], image_decoders: int):
        self.worker = worker
        self.model_name = model_name
        self.limits = limits
        self.body_limit = body_limit
        self.api_key = api_key
        self.created = int(time.time())
        self.decoders = anyio.Semaphore(max(1, image_decoders))

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise AuthenticationError("Missing or wrong API key: send 'Authorization: Bearer <key>'.")

    async def read_body(self, request: Request) -> bytes:
        limit = self.body_limit
        size = request.headers.get("content-length")
        if size is not None:
            if not size.isdigit():
                raise BadRequestError("Bad Content-Length header.")
            if int(size) > limit:
                raise PayloadTooLargeError(f"The request body is {size} bytes, over the limit of {limit}.")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLargeError(f"The request body is over the limit of {limit} bytes.")
        except ClientDisconnect:
            # A normal event (the client gave up, or uvicorn refused a broken chunked body and closed):
            # one line, no traceback, no answer.
            client = request.client
            log.info("client %s disconnected during the upload of %s %s (%d of %s bytes received)",
                     f"{client.host}:{client.port}" if client else "?", request.method, request.url.path,
                     len(body), size or "?")
            raise ClientGone() from None
        return bytes(body)

    async def parse(self, request: Request, parser) -> ChatCall:
        """Auth, content type, readiness, then the body through `parser` (parse_original/parse_openai)."""
        received = time.monotonic()
        self.check_auth(request)
        check_json(request)
        self.worker.require_ready()
        body = await self.read_body(request)

        def run():
            return parser(loads(body), self.limits, self.worker.max_context)
        call = await anyio.to_thread.run_sync(run) if len(body) > _THREAD_PARSE_BYTES else run()
        call.received_at = received
        return call

    async def start(self, call: ChatCall) -> Stream:
        """Fetch and decode the image, tokenize, queue: every failure here is the client's (or 503)."""
        data = await call.image.load_bytes(self.limits) if call.image is not None else None
        generator = torch.Generator().manual_seed(call.seed) if call.seed is not None else None

        def prepare():
            image = decode_image(data, self.limits) if data is not None else None
            try:
                return self.worker.prepare(call.query, call.history, image, call.english, call.params, generator)
            except PromptTooLongError as e:
                raise BadRequestError(str(e), type="context_length_exceeded") from None
        if data is not None:
            async with self.decoders:
                job = await anyio.to_thread.run_sync(prepare)
        else:
            job = await anyio.to_thread.run_sync(prepare)
        stream = self.worker.submit(job)
        metrics = getattr(self.worker, "metrics", None)
        if metrics is not None and call.received_at is not None:
            metrics.prepared(job.submitted_at - call.received_at)
        return stream

    async def complete(self, stream: Stream, call: ChatCall):
        """Run to the end: (text, finish_reason)."""
        text = TextAssembler(self.worker.engine.streaming_decode(), call.stop)
        try:
            async for ids in stream:
                if call.stop:
                    text.add(ids)
                    if text.stopped:
                        break
                else:
                    text.ids.extend(ids)          # decode once at the end
        finally:
            stream.cancel()                       # no-op once finished; stops the row otherwise
        text.finish()
        return text.text, ("stop" if text.stopped else stream.finish_reason)


def service_of(request: Request) -> ApiService:
    """The ApiService of the app serving `request` (create_app puts it on app.state)."""
    return request.app.state.service
