"""Errors that front ends turn into HTTP answers: each carries its status code and an error type.

The JSON body of every error answer is {"error": {"message": ..., "type": ...}, "status": <code>}.
"""


class ServingError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, status: int = None, type: str = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type}, "status": self.status}


class BadRequestError(ServingError):
    """Malformed or invalid input: wrong JSON, wrong types, bad values, unreadable image..."""
    status = 400
    type = "invalid_request_error"


class PayloadTooLargeError(ServingError):
    status = 413
    type = "request_too_large"


class AuthenticationError(ServingError):
    status = 401
    type = "authentication_error"


class QueueFullError(ServingError):
    """The bounded queue of waiting requests is full: try again later (HTTP 503)."""
    status = 503
    type = "server_overloaded"


class NotReadyError(ServingError):
    """The model is still loading, failed to load, or the worker has stopped (HTTP 503)."""
    status = 503
    type = "model_not_ready"


class ModelLoadError(ServingError):
    """The model could not be loaded for a reason its message explains (no checkpoint there, a tokenizer
    that does not fit): the front ends print it once, without a traceback (a bug still gets one)."""
    status = 503
    type = "model_not_ready"


class GenerationError(ServingError):
    """Generation itself failed (out of memory, NaN logits...): a server fault, not the client's."""
    status = 500
    type = "generation_error"


class UnsupportedMediaTypeError(ServingError):
    """A POST body not sent as application/json (HTTP 415). Browsers send text/plain or form bodies to
    any site without a CORS preflight; insisting on JSON keeps web pages from forging requests."""
    status = 415
    type = "unsupported_media_type"
