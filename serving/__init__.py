"""Serving VisualGLM-6B: the model worker, request parsing, the HTTP API and the Gradio UI.

Front-end agnostic: everything takes a chat engine (model.chat.ChatEngine for sat checkpoints, or
another engine with the same methods), or a loader returning one, so that the sat and the Hugging Face
servers and demos share all of this code.
"""
from .errors import (BadRequestError, GenerationError, NotReadyError, PayloadTooLargeError, QueueFullError,
                     ServingError)
from .worker import Job, Stream, Worker

__all__ = ["Worker", "Job", "Stream", "ServingError", "BadRequestError", "PayloadTooLargeError",
           "QueueFullError", "NotReadyError", "GenerationError", "create_app"]


def create_app(*args, **kwargs):
    """See serving.app.create_app (imported lazily: FastAPI is only needed by the HTTP server)."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)
