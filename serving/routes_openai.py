"""The OpenAI-compatible endpoints: /v1/models and /v1/chat/completions (whole, or streamed as SSE)."""
import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .errors import ServingError
from .protocol import ChatCall, parse_openai
from .service import ApiService, service_of
from .streaming import ClientGone, EventStreamResponse, until_disconnect
from .text import TextAssembler
from .worker import Stream

log = logging.getLogger("visualglm.serving")

router = APIRouter()


def model_card(service: ApiService) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "visualglm"}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [model_card(service_of(request))]}


@router.get("/v1/models/{name:path}")
async def one_model(name: str, request: Request):
    service = service_of(request)
    if name != service.model_name:
        raise ServingError(f"Model {name!r} not found; this server has {service.model_name!r}.", status=404,
                           type="not_found")
    return model_card(service)


class Completion:
    """One chat completion's answer, whole or as chunks: its id and time are shared by every chunk, and
    its usage is read from the Stream when asked for (after the tokens are counted)."""

    def __init__(self, service: ApiService, call: ChatCall, stream: Stream):
        self.service = service
        self.call = call
        self.stream = stream
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self) -> dict:
        stream = self.stream
        return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
                "total_tokens": stream.prompt_tokens + stream.completion_tokens}

    def body(self, text: str, reason: str) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.service.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": self.usage()}

    def chunk(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.service.model_name, "choices": choices, **extra}

    def event(self, delta: dict, reason=None) -> str:
        chunk = self.chunk([{"index": 0, "delta": delta, "finish_reason": reason}])
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events(self):
        """The SSE stream. Once the answer has begun an error can only be told as one more event."""
        stream, call = self.stream, self.call
        try:
            yield self.event({"role": "assistant", "content": ""})
            text = TextAssembler(self.service.worker.engine.streaming_decode(), call.stop)
            async for ids in stream:
                delta = text.add(ids)
                if delta:
                    yield self.event({"content": delta})
                if text.stopped:
                    break
            stream.cancel()
            tail = text.finish()
            if tail:
                yield self.event({"content": tail})
            yield self.event({}, "stop" if text.stopped else stream.finish_reason)
            if call.include_usage:
                yield f"data: {json.dumps(self.chunk([], usage=self.usage()))}\n\n"
        except Exception as e:  # noqa: BLE001 - the answer has begun: errors become an event
            if not isinstance(e, ServingError):
                log.error("unexpected error while streaming %s", self.id, exc_info=e)
                e = ServingError(f"Internal error: {type(e).__name__}")
            yield f"data: {json.dumps(e.to_json(), ensure_ascii=False)}\n\n"
        finally:
            stream.cancel()
        yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    service = service_of(request)
    call = await service.parse(request, parse_openai)
    stream = await service.start(call)
    completion = Completion(service, call, stream)
    if call.stream:
        return EventStreamResponse(completion.events(), on_disconnect=stream.cancel)
    try:
        text, reason = await until_disconnect(request, service.complete(stream, call), stream.cancel)
    except ClientGone:
        return Response(status_code=499)
    return completion.body(text, reason)
