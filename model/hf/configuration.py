"""VisualGLMConfig: the Hugging Face config.json of VisualGLM-6B (spec 2.2), without remote code.

The field names are those of THUDM/visualglm-6b's config.json; `eva_config` and `qformer_config` are
dicts in sat's argument names (the same values as `eva_args` / `qformer_args` of the sat
model_config.json, spec 1.2). Defaults are those of the released model (not the stale ChatGLM-v0
defaults of the upstream class).
"""
from transformers import PretrainedConfig

from ..configs import VISUALGLM_6B


class VisualGLMConfig(PretrainedConfig):
    model_type = "visualglm"
    attribute_map = {"num_hidden_layers": "num_layers"}       # the name transformers' caches read

    def __init__(self, vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32,
                 inner_hidden_size=None, layernorm_epsilon=1e-5, max_sequence_length=2048,
                 image_length=32, eva_config=None, qformer_config=None, bos_token_id=130004,
                 eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001, pad_token_id=3,
                 position_encoding_2d=True, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.inner_hidden_size = inner_hidden_size or 4 * hidden_size
        self.layernorm_epsilon = layernorm_epsilon
        self.max_sequence_length = max_sequence_length
        self.image_length = image_length
        self.eva_config = dict(eva_config if eva_config is not None else VISUALGLM_6B["eva_args"])
        self.qformer_config = dict(qformer_config if qformer_config is not None else VISUALGLM_6B["qformer_args"])
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.position_encoding_2d = position_encoding_2d
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)     # lm_head is its own matrix (spec 1.4)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


class ReleasedVisualGLMConfig(VisualGLMConfig):
    """Reads the config.json of the released THUDM/visualglm-6b folder (model_type "chatglm", an auto_map
    pointing at remote code that is not needed) as a VisualGLMConfig, so AutoModel / AutoTokenizer then
    pick this package's classes. The text-only ChatGLM-6B shares that model_type: a config without
    `eva_config` is refused instead of getting a random vision tower."""
    model_type = "chatglm"

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if "eva_config" not in config_dict or "qformer_config" not in config_dict:
            raise ValueError("this model_type 'chatglm' config has no eva_config / qformer_config: it is not a "
                             "VisualGLM-6B folder (a text-only ChatGLM-6B?), which model/hf does not load")
        config_dict = {k: v for k, v in config_dict.items() if k not in ("auto_map", "model_type")}
        return VisualGLMConfig.from_dict(config_dict, **kwargs)
