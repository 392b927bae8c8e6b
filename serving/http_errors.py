"""Every failure as an HTTP answer: JSON {"error": {"message", "type"}, "status"}, or a bare 499 for a
client that has gone.

No exception reaches uvicorn while an answer can still be given: uvicorn closes a keep-alive connection
after any exception that reaches it (Starlette's ServerErrorMiddleware answers, then re-raises), and
that reset the client's next request on the connection. anyio task groups wrap what they raise in
ExceptionGroups; those are unwrapped so that a ServingError inside still gets its own status.
"""
import json
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import BadRequestError, ServingError
from .streaming import ClientGone

try:
    BaseExceptionGroup
except NameError:                       # Python < 3.11: the backport anyio depends on
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("visualglm.serving")

_STATUS_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def unwrap(error: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of a single member, else `error` itself."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def error_response(e: ServingError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.to_json(), status_code=e.status, headers=headers)


def answer_escaped(e: Exception, scope) -> Response:
    """The answer to an exception that got past the routes' own handling."""
    if isinstance(e, ServingError):
        return error_response(e)
    if isinstance(e, (ClientGone, ClientDisconnect)):
        return Response(status_code=499)
    log.error("unexpected error on %s %s", scope.get("method"), scope.get("path"), exc_info=e)
    return error_response(ServingError(f"Internal error: {type(e).__name__}"))


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


async def on_serving_error(request, e: ServingError):
    return error_response(e)


async def on_http_error(request, e: StarletteHTTPException):
    """Starlette's own 404/405/... in the JSON error shape, saying what was asked for."""
    message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
    if e.status_code == 404:
        message = f"No such endpoint: {request.method} {request.url.path}"
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    err = ServingError(message, status=e.status_code, type=_STATUS_TYPES.get(e.status_code, "http_error"))
    return JSONResponse(err.to_json(), status_code=e.status_code, headers=getattr(e, "headers", None))


async def on_validation_error(request, e: RequestValidationError):
    return error_response(BadRequestError(f"Invalid request: {e.errors()}"))


async def on_client_gone(request, e: ClientGone):
    return Response(status_code=499)      # nobody reads it: uvicorn drops answers to closed connections


def register_error_handling(app: FastAPI) -> None:
    """The ErrorBoundary middleware and the exception handlers. Call it before adding any middleware
    that must wrap the boundary's answers (CORS)."""
    app.add_middleware(ErrorBoundary, answer=answer_escaped)
    app.add_exception_handler(ServingError, on_serving_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientGone, on_client_gone)
