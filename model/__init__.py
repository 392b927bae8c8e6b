"""VisualGLM-6B. `model` itself is the flavour-neutral chat core and never imports sat; the sat model
lives in `model.sat` and is loaded on first use of its names here, so the original snippet

    from model import chat, VisualGLMModel

works as it did upstream.
"""
from .chat import ChatEngine, chat, stream_chat

_SAT_NAMES = ("VisualGLMModel", "FineTuneVisualGLMModel")


def __getattr__(name):
    if name in _SAT_NAMES:
        from . import sat
        return getattr(sat, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = ["ChatEngine", "chat", "stream_chat", *_SAT_NAMES]
