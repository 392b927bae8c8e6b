"""The HTTP API: the original `POST /` contract, OpenAI chat completions, /v1/models and /health.

    app = create_app(worker_or_engine_or_loader, allow_remote_images=False, ...)

The event loop only reads requests and writes answers: JSON parsing of large bodies, image decoding and
tokenizing run in threads, and the model runs on the Worker's own thread. Every error is JSON
{"error": {"message", "type"}, "status"} with a 4xx status for the client's mistakes, 503 while the
model loads or the queue is full, and 500 only where generation itself fails. POST bodies must be sent as
application/json (415 otherwise): browsers send other types cross-site without a CORS preflight.

No exception reaches uvicorn while an answer can still be given: uvicorn closes a keep-alive connection
after any exception that reaches it (Starlette's ServerErrorMiddleware answers, then re-raises), and
that reset the client's next request on the connection. anyio task groups wrap what they raise in
ExceptionGroups; those are unwrapped so that a ServingError inside still gets its own status.
"""
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional, Sequence

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.defaults import SERVER_MAX_IMAGE_BYTES, SERVER_MAX_IMAGE_PIXELS
from model.prompts import PromptTooLongError

from .errors import (AuthenticationError, BadRequestError, PayloadTooLargeError, ServingError,
                     UnsupportedMediaTypeError)
from .images import ImageLimits, decode_image
from .protocol import ChatCall, loads, parse_openai, parse_original
from .text import TextAssembler
from .worker import Stream, Worker

try:
    BaseExceptionGroup
except NameError:                       # Python < 3.11: the backport anyio depends on
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("visualglm.serving")

_THREAD_PARSE_BYTES = 256 * 1024        # bodies larger than this are parsed off the event loop
_STATUS_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def unwrap(error: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of a single member, else `error` itself."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def is_json(content_type: str) -> bool:
    """application/json or application/<anything>+json, with any parameters (charset...)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class ErrorBoundary:
    """ASGI middleware, inside ServerErrorMiddleware: answers whatever a route lets escape (ServingErrors
    wrapped in exception groups, unexpected errors) with JSON here, so that the exception never reaches
    the server and the connection stays usable. `answer(error, scope) -> Response`."""

    def __init__(self, app, answer):
        self.app = app
        self.answer = answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - every error gets an answer
            if started:          # half an answer went out: only closing the connection can tell the client
                raise
            await self.answer(unwrap(e), scope)(scope, receive, send)


def as_worker(target, **worker_options) -> Worker:
    """A Worker from a Worker, an engine, or a callable that loads and returns an engine."""
    if isinstance(target, Worker):
        return target
    if callable(target) and not hasattr(target, "make_request"):
        return Worker(loader=target, **worker_options)
    return Worker(target, **worker_options)


class EventStreamResponse(StreamingResponse):
    """Server-sent events that notice a client leaving even while no event is due: the stream is
    cancelled (and the generation row stopped) as soon as the connection closes."""

    def __init__(self, content, on_disconnect):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def produce():
                try:
                    await self.stream_response(send)
                except OSError:
                    self._on_disconnect()
                finally:
                    tg.cancel_scope.cancel()

            async def watch():
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self._on_disconnect()
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(produce)
            tg.start_soon(watch)
        closer = getattr(self.body_iterator, "aclose", None)
        if closer is not None:
            await closer()


async def until_disconnect(request: Request, awaitable, on_disconnect):
    """Await `awaitable`, but give up (calling on_disconnect) if the client disconnects meanwhile.
    Its exceptions propagate as they are (the task group would wrap them in an ExceptionGroup)."""
    box = {}
    async with anyio.create_task_group() as tg:
        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    on_disconnect()
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            box["result"] = await awaitable
        except Exception as e:  # noqa: BLE001 - raised again below, outside the task group
            box["error"] = e
        finally:
            tg.cancel_scope.cancel()
    if "error" in box:
        raise box["error"]
    if "result" not in box:
        raise ClientGone()
    return box["result"]


def create_app(target, *, model_name: str = "visualglm-6b", allow_remote_images: bool = False,
               allow_private_image_hosts: bool = False, max_image_bytes: int = SERVER_MAX_IMAGE_BYTES,
               max_image_pixels: int = SERVER_MAX_IMAGE_PIXELS, max_body_bytes: Optional[int] = None,
               api_key: Optional[str] = None, cors_origins: Sequence[str] = (), image_decoders: int = 4,
               **worker_options) -> FastAPI:
    """target: a Worker, a ChatEngine, or a loader callable returning one (loaded in the background
    after the server starts; /health answers 503 until then). worker_options (max_batch, max_queue,
    batch_wait, ...) apply when the app creates the Worker. The app starts the worker if it is not
    running yet and stops it on shutdown if it started it."""
    worker = as_worker(target, **worker_options)
    limits = ImageLimits(max_bytes=max_image_bytes, max_pixels=max_image_pixels, allow_remote=allow_remote_images,
                         allow_private_hosts=allow_private_image_hosts)
    body_limit = max_body_bytes or (max_image_bytes * 4 // 3 + 2 * 1024 * 1024)
    created = int(time.time())
    decoders = anyio.Semaphore(max(1, image_decoders))

    @asynccontextmanager
    async def lifespan(app):
        owned = not worker.started
        worker.start()
        try:
            yield
        finally:
            if owned:
                await anyio.to_thread.run_sync(worker.stop)

    # redirect_slashes off: "/v1/chat/completions/" is a 404, not a bodyless 307 to a Location built
    # from the client's Host header
    app = FastAPI(title="VisualGLM-6B API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.worker = worker
    app.state.limits = limits

    def answer_escaped(e: Exception, scope) -> Response:
        if isinstance(e, ServingError):
            return error_response(e)
        if isinstance(e, (ClientGone, ClientDisconnect)):
            return Response(status_code=499)
        log.error("unexpected error on %s %s", scope.get("method"), scope.get("path"), exc_info=e)
        return error_response(ServingError(f"Internal error: {type(e).__name__}"))
    app.add_middleware(ErrorBoundary, answer=answer_escaped)     # added first: CORS wraps its answers
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    # -- errors ------------------------------------------------------------------------------------
    def error_response(e: ServingError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.to_json(), status_code=e.status, headers=headers)

    @app.exception_handler(ServingError)
    async def on_serving_error(request, e: ServingError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            message = f"No such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        err = ServingError(message, status=e.status_code, type=_STATUS_TYPES.get(e.status_code, "http_error"))
        return JSONResponse(err.to_json(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        return error_response(BadRequestError(f"Invalid request: {e.errors()}"))

    @app.exception_handler(ClientGone)
    async def on_client_gone(request, e: ClientGone):
        return Response(status_code=499)      # nobody reads it: uvicorn drops answers to closed connections

    # -- helpers ------------------------------------------------------------------------------------
    def check_auth(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise AuthenticationError("Missing or wrong API key: send 'Authorization: Bearer <key>'.")

    def check_json(request: Request) -> None:
        ctype = request.headers.get("content-type", "")
        if not is_json(ctype):
            raise UnsupportedMediaTypeError(f"Send the request body as JSON with 'Content-Type: application/json' "
                                            f"(got {ctype or 'no Content-Type'!r}).")

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None:
            if not size.isdigit():
                raise BadRequestError("Bad Content-Length header.")
            if int(size) > body_limit:
                raise PayloadTooLargeError(f"The request body is {size} bytes, over the limit of {body_limit}.")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > body_limit:
                    raise PayloadTooLargeError(f"The request body is over the limit of {body_limit} bytes.")
        except ClientDisconnect:
            # A normal event (the client gave up, or uvicorn refused a broken chunked body and closed):
            # one line, no traceback, no answer.
            client = request.client
            log.info("client %s disconnected during the upload of %s %s (%d of %s bytes received)",
                     f"{client.host}:{client.port}" if client else "?", request.method, request.url.path,
                     len(body), size or "?")
            raise ClientGone() from None
        return bytes(body)

    async def parse(request: Request, parser) -> ChatCall:
        check_auth(request)
        check_json(request)
        worker.require_ready()
        body = await read_body(request)

        def run():
            return parser(loads(body), limits, worker.max_context)
        if len(body) > _THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(run)
        return run()

    async def start(call: ChatCall) -> Stream:
        """Fetch and decode the image, tokenize, queue: every failure here is the client's (or 503)."""
        data = await call.image.load_bytes(limits) if call.image is not None else None
        generator = torch.Generator().manual_seed(call.seed) if call.seed is not None else None

        def prepare():
            image = decode_image(data, limits) if data is not None else None
            try:
                return worker.prepare(call.query, call.history, image, call.english, call.params, generator)
            except PromptTooLongError as e:
                raise BadRequestError(str(e), type="context_length_exceeded") from None
        if data is not None:
            async with decoders:
                job = await anyio.to_thread.run_sync(prepare)
        else:
            job = await anyio.to_thread.run_sync(prepare)
        return worker.submit(job)

    async def complete(stream: Stream, call: ChatCall):
        """Run to the end: (text, finish_reason)."""
        text = TextAssembler(worker.engine.decode, call.stop)
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

    # -- endpoints ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        body = {"status": "ok" if worker.ready else worker.state, "model": model_name, "queued": worker.queued,
                "running": worker.running, "max_batch": worker.max_batch, "max_queue": worker.max_queue}
        if worker.error:
            body["error"] = worker.error
        return JSONResponse(body, status_code=200 if worker.ready else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "visualglm"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model_name:
            raise ServingError(f"Model {name!r} not found; this server has {model_name!r}.", status=404,
                               type="not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "visualglm"}

    @app.post("/")
    async def original(request: Request):
        """The original VisualGLM-6B API contract."""
        call = await parse(request, parse_original)
        stream = await start(call)
        try:
            text, _ = await until_disconnect(request, complete(stream, call), stream.cancel)
        except ClientGone:
            return Response(status_code=499)
        history = [[q, a] for q, a in call.history] + [[call.query, text]]
        return {"response": text, "result": text, "history": history, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        call = await parse(request, parse_openai)
        stream = await start(call)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        def usage():
            return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
                    "total_tokens": stream.prompt_tokens + stream.completion_tokens}

        if not call.stream:
            try:
                text, reason = await until_disconnect(request, complete(stream, call), stream.cancel)
            except ClientGone:
                return Response(status_code=499)
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason}],
                    "usage": usage()}

        def event(delta, reason=None, **extra):
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield event({"role": "assistant", "content": ""})
                text = TextAssembler(worker.engine.decode, call.stop)
                async for ids in stream:
                    delta = text.add(ids)
                    if delta:
                        yield event({"content": delta})
                    if text.stopped:
                        break
                stream.cancel()
                tail = text.finish()
                if tail:
                    yield event({"content": tail})
                yield event({}, "stop" if text.stopped else stream.finish_reason)
                if call.include_usage:
                    chunk = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                             "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(chunk)}\n\n"
            except Exception as e:  # noqa: BLE001 - the answer has begun: errors become an event
                if not isinstance(e, ServingError):
                    log.error("unexpected error while streaming %s", cid, exc_info=e)
                    e = ServingError(f"Internal error: {type(e).__name__}")
                yield f"data: {json.dumps(e.to_json(), ensure_ascii=False)}\n\n"
            finally:
                stream.cancel()
            yield "data: [DONE]\n\n"

        return EventStreamResponse(events(), on_disconnect=stream.cancel)

    return app
