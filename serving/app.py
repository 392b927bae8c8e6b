"""The HTTP API: the original `POST /` contract, OpenAI chat completions, /v1/models and /health.

    app = create_app(worker_or_engine_or_loader, allow_remote_images=False, ...)

The event loop only reads requests and writes answers: JSON parsing of large bodies, image decoding and
tokenizing run in threads, and the model runs on the Worker's own thread. Every error is JSON
{"error": {"message", "type"}, "status"} with a 4xx status for the client's mistakes, 503 while the
model loads or the queue is full, and 500 only where generation itself fails. POST bodies must be sent as
application/json (415 otherwise): browsers send other types cross-site without a CORS preflight.

Where things live: service.py (ApiService: a request into Worker calls), routes_*.py (the endpoints,
one module per group), streaming.py (SSE and client disconnects), http_errors.py (exceptions into
answers, so that none reaches uvicorn and breaks a keep-alive connection).
"""
from contextlib import asynccontextmanager
from typing import Optional, Sequence

import anyio
from fastapi import FastAPI

from model.defaults import SERVER_MAX_IMAGE_BYTES, SERVER_MAX_IMAGE_PIXELS

from .engine_process import ProcessWorker
from .http_errors import register_error_handling
from .images import ImageLimits
from .metrics import ResponseCounter, ServingMetrics
from .routes_health import router as health_router
from .routes_openai import router as openai_router
from .routes_original import router as original_router
from .service import ApiService
from .worker import Worker


def as_worker(target, **worker_options) -> Worker:
    """A Worker from a Worker (or a ProcessWorker), an engine, or a callable that loads and returns an engine."""
    if isinstance(target, (Worker, ProcessWorker)):
        return target
    if callable(target) and not hasattr(target, "make_request"):
        return Worker(loader=target, **worker_options)
    return Worker(target, **worker_options)


def worker_lifespan(worker: Worker):
    """Start the worker with the app; stop it on shutdown only if the app was the one to start it."""
    @asynccontextmanager
    async def lifespan(app):
        owned = not worker.started
        worker.start()
        try:
            yield
        finally:
            if owned:
                await anyio.to_thread.run_sync(worker.stop)
    return lifespan


def create_app(target, *, model_name: str = "visualglm-6b", allow_remote_images: bool = False,
               allow_private_image_hosts: bool = False, max_image_bytes: int = SERVER_MAX_IMAGE_BYTES,
               max_image_pixels: int = SERVER_MAX_IMAGE_PIXELS, max_body_bytes: Optional[int] = None,
               api_key: Optional[str] = None, cors_origins: Sequence[str] = (), image_decoders: int = 4,
               metrics_public: bool = False, **worker_options) -> FastAPI:
    """target: a Worker, a ChatEngine, or a loader callable returning one (loaded in the background
    after the server starts; /health answers 503 until then). worker_options (max_batch, max_queue,
    batch_wait, ...) apply when the app creates the Worker. The app starts the worker if it is not
    running yet and stops it on shutdown if it started it. GET /metrics (Prometheus) needs the API key
    when there is one, unless metrics_public."""
    worker = as_worker(target, **worker_options)
    limits = ImageLimits(max_bytes=max_image_bytes, max_pixels=max_image_pixels, allow_remote=allow_remote_images,
                         allow_private_hosts=allow_private_image_hosts)
    # room for the largest image as base64 plus the rest of the JSON
    body_limit = max_body_bytes or (max_image_bytes * 4 // 3 + 2 * 1024 * 1024)
    service = ApiService(worker, model_name=model_name, limits=limits, body_limit=body_limit, api_key=api_key,
                         image_decoders=image_decoders)

    # redirect_slashes off: "/v1/chat/completions/" is a 404, not a bodyless 307 to a Location built
    # from the client's Host header
    app = FastAPI(title="VisualGLM-6B API", lifespan=worker_lifespan(worker), docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    app.state.service = service          # the routes find it here
    app.state.worker = worker
    app.state.limits = limits
    app.state.metrics = worker.metrics = ServingMetrics(worker)
    app.state.metrics_public = metrics_public

    register_error_handling(app)         # first: the CORS middleware added next wraps its answers
    app.add_middleware(ResponseCounter, metrics=app.state.metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    for router in (health_router, openai_router, original_router):
        app.include_router(router)
    return app
