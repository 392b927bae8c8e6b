"""The Hugging Face flavour of VisualGLM-6B, without remote code and without sat: importing this package
registers VisualGLMConfig / VisualGLMForConditionalGeneration with AutoConfig and AutoModel, so a
converted folder (python -m model.convert sat-to-hf) loads with AutoModel.from_pretrained(folder)."""
from transformers import AutoConfig, AutoModel

from .backend import HFBackend
from .configuration import VisualGLMConfig
from .modeling import VisualGLMForConditionalGeneration

AutoConfig.register(VisualGLMConfig.model_type, VisualGLMConfig, exist_ok=True)
AutoModel.register(VisualGLMConfig, VisualGLMForConditionalGeneration, exist_ok=True)

__all__ = ["HFBackend", "VisualGLMConfig", "VisualGLMForConditionalGeneration"]
