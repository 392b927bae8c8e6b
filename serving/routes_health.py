"""GET /health: 200 once the model is loaded, 503 (with the worker's state) until then or after a failure.
GET /metrics: Prometheus text format (serving/metrics.py)."""
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .service import service_of

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    service = service_of(request)
    worker = service.worker
    body = {"status": "ok" if worker.ready else worker.state, "model": service.model_name, "queued": worker.queued,
            "running": worker.running, "max_batch": worker.max_batch, "max_queue": worker.max_queue,
            "batching": "continuous" if worker.slots is not None else "static", "slots": worker.slots_total}
    if worker.error:
        body["error"] = worker.error
    return JSONResponse(body, status_code=200 if worker.ready else 503)


@router.get("/metrics")
async def metrics(request: Request):
    if not request.app.state.metrics_public:
        service_of(request).check_auth(request)
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)
