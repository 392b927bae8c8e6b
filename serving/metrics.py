"""GET /metrics: Prometheus text format, from the standard client library.

    visualglm_requests_total{outcome}            requests by how they ended: stop, length, cancelled,
                                                 error, rejected (queue full)
    visualglm_http_responses_total{status}       HTTP answers by status code
    visualglm_generated_tokens_total             answer tokens sent
    visualglm_time_to_first_token_seconds        histogram, from queueing to the first token
    visualglm_request_duration_seconds           histogram, from queueing to the end
    visualglm_request_prepare_seconds            histogram, from the request's arrival to its queueing
                                                 (reading and parsing the body, decoding the image,
                                                 tokenizing)
    visualglm_queue_wait_seconds                 histogram, from queueing to leaving the queue for the batch
                                                 (then come its image and prefill: the rest of the time to
                                                 first token)
    visualglm_handoff_seconds                    histogram, from queueing on the server to the model
                                                 process's own queue (only with the model in its own process)
    visualglm_batch_step_seconds{phase}          histogram of the model thread's work per step: "images"
                                                 (encoding newcomers' images), "admit" (their prefill),
                                                 "decode" (one token for every running request), "send"
                                                 (handing tokens out)
    visualglm_queue_length                       requests waiting for a place in the batch
    visualglm_running_requests                   requests decoding (the running batch size)
    visualglm_kv_slots_in_use / _total           key/value slots (continuous batching; static: batch places)

Each app has its own registry (several apps may live in one process, as in the tests).
"""
import time
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; first tokens are fast, whole answers take up to minutes
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                30.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, worker):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("visualglm_requests", "Requests by how they ended", ["outcome"], registry=r)
        self.responses = Counter("visualglm_http_responses", "HTTP responses by status code", ["status"], registry=r)
        self.tokens = Counter("visualglm_generated_tokens", "Answer tokens generated", registry=r)
        self.ttft = Histogram("visualglm_time_to_first_token_seconds", "Time from queueing to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram("visualglm_request_duration_seconds", "Time from queueing to the last token",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.prepare = Histogram("visualglm_request_prepare_seconds", "Time from a request's arrival to its queueing",
                                 buckets=WAIT_BUCKETS, registry=r)
        self.queue_wait = Histogram("visualglm_queue_wait_seconds",
                                    "Time from queueing to leaving the queue for the batch", buckets=WAIT_BUCKETS,
                                    registry=r)
        self.handoff = Histogram("visualglm_handoff_seconds", "Time from queueing to the model process's queue",
                                 buckets=WAIT_BUCKETS, registry=r)
        self.steps = Histogram("visualglm_batch_step_seconds", "Model thread time per step, by phase", ["phase"],
                               buckets=STEP_BUCKETS, registry=r)
        Gauge("visualglm_queue_length", "Requests waiting", registry=r).set_function(lambda: worker.queued)
        Gauge("visualglm_running_requests", "Requests decoding", registry=r).set_function(lambda: worker.running)
        Gauge("visualglm_kv_slots_in_use", "Key/value slots held by running requests",
              registry=r).set_function(lambda: worker.running)
        Gauge("visualglm_kv_slots_total", "Key/value slots (sequences that can run at once)",
              registry=r).set_function(lambda: worker.slots_total)

    # called by the worker thread
    def observe(self, outcome: str, job=None) -> None:
        self.requests.labels(outcome).inc()
        if job is None or job.submitted_at is None:
            return
        now = time.monotonic()
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.submitted_at)
        self.duration.observe(now - job.submitted_at)

    def step(self, phase: str, seconds: float) -> None:
        self.steps.labels(phase).observe(seconds)

    def prepared(self, seconds: float) -> None:
        self.prepare.observe(seconds)

    def admitted(self, waited: float, handoff: Optional[float]) -> None:
        """A request leaves the queue for the batch, `waited` seconds after it was queued (handoff of them
        on the way to the model process; None when the model runs in this one)."""
        self.queue_wait.observe(waited)
        if handoff is not None:
            self.handoff.observe(handoff)

    def token(self, count: int = 1) -> None:
        self.tokens.inc(count)

    # called by the app
    def response(self, status: int) -> None:
        self.responses.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ResponseCounter:
    """ASGI middleware counting HTTP responses by status (plain ASGI, so streaming answers pass untouched)."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.response(message["status"])
            await send(message)
        await self.app(scope, receive, counting_send)
