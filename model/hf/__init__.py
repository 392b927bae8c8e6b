"""The Hugging Face flavour of VisualGLM-6B, without remote code and without sat: importing this package
registers the config, model and tokenizer classes with AutoConfig / AutoModel / AutoModelForCausalLM /
AutoTokenizer, for model_type "visualglm" (folders written by python -m model.convert sat-to-hf) and
"chatglm" (the released THUDM/visualglm-6b folder, whose auto_map and remote code are then not used)."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .backend import HFBackend
from .configuration import ReleasedVisualGLMConfig, VisualGLMConfig
from .modeling import VisualGLMForConditionalGeneration
from .tokenization import ChatGLMTokenizer

AutoConfig.register(VisualGLMConfig.model_type, VisualGLMConfig, exist_ok=True)
AutoConfig.register(ReleasedVisualGLMConfig.model_type, ReleasedVisualGLMConfig, exist_ok=True)  # -> VisualGLMConfig
AutoModel.register(VisualGLMConfig, VisualGLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(VisualGLMConfig, VisualGLMForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(VisualGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)

__all__ = ["ChatGLMTokenizer", "HFBackend", "ReleasedVisualGLMConfig", "VisualGLMConfig",
           "VisualGLMForConditionalGeneration"]
