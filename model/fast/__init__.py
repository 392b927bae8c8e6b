"""The fast inference path (gpt-fast style): a plain-torch GLM over the loaded model's own weights, with
a static key/value cache, SDPA attention and the one-token step captured in a CUDA graph on GPUs.
It is a backend (model/backend.py) like the sat one, and imports nothing from sat."""
from .backend import FastBackend

__all__ = ["FastBackend"]
