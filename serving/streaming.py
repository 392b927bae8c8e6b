"""The client's connection while an answer is being made: noticing that it went away.

A client that leaves must free its batch row at once, not when the next token would have been written,
so both helpers watch for the ASGI `http.disconnect` message alongside the work.
"""
import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


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
