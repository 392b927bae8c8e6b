"""POST /: the original VisualGLM-6B API contract (prompt, image, history in; response and history out)."""
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .protocol import parse_original
from .service import service_of
from .streaming import ClientGone, until_disconnect

router = APIRouter()


@router.post("/")
async def original(request: Request):
    """The original VisualGLM-6B API contract."""
    service = service_of(request)
    call = await service.parse(request, parse_original)
    stream = await service.start(call)
    try:
        text, _ = await until_disconnect(request, service.complete(stream, call), stream.cancel)
    except ClientGone:
        return Response(status_code=499)
    history = [[q, a] for q, a in call.history] + [[call.query, text]]
    return {"response": text, "result": text, "history": history, "status": 200,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
