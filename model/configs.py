"""Model configurations as plain dicts, in the key names of sat's model_config.json, and the
command-line flags that set them (sat-free, so that the trainer's --help needs no sat)."""
import json

# The released visualglm-6b checkpoint (spec section 1.2).
VISUALGLM_6B = {
    "model_class": "VisualGLMModel",
    "tokenizer_type": "THUDM/chatglm-6b",
    "num_layers": 28,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "vocab_size": 130528,
    "layernorm_order": "post",
    "model_parallel_size": 1,
    "max_sequence_length": 2048,
    "image_length": 32,
    "eva_args": {
        "num_layers": 39, "hidden_size": 1408, "num_attention_heads": 16, "vocab_size": 1,
        "layernorm_order": "pre", "model_parallel_size": 1, "max_sequence_length": 257,
        "inner_hidden_size": 6144, "use_final_layernorm": False, "layernorm_epsilon": 1e-06,
        "image_size": [224, 224], "pre_len": 1, "post_len": 0, "in_channels": 3, "num_classes": 0,
        "patch_size": 14,
    },
    "qformer_args": {
        "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "vocab_size": 32,
        "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
        "is_decoder": [True, False] * 6, "cross_attn_hidden_size": 1408, "layernorm_epsilon": 1e-12,
    },
    "bos_token_id": 130004,
    "mask_token_id": 130000,
    "gmask_token_id": 130001,
    "pad_token_id": 3,
}


def tiny_config(vocab_size=1000, bos_token_id=5, mask_token_id=6, gmask_token_id=7, pad_token_id=3,
                num_layers=2, hidden_size=64, num_attention_heads=4, image_length=32,
                image_size=224, patch_size=14, eva_layers=1, eva_hidden=32, eva_heads=None, qformer_layers=2,
                qformer_hidden=64, qformer_heads=None, tokenizer_type=None, **extra) -> dict:
    """A small VisualGLM of the same architecture, for tests and the bundled model."""
    return {
        "model_class": "VisualGLMModel",
        "tokenizer_type": tokenizer_type,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "inner_hidden_size": 4 * hidden_size,
        "vocab_size": vocab_size,
        "layernorm_order": "post",
        "model_parallel_size": 1,
        "max_sequence_length": 2048,
        "image_length": image_length,
        "eva_args": {
            "num_layers": eva_layers, "hidden_size": eva_hidden, "num_attention_heads": eva_heads or max(1, eva_hidden // 16),
            "vocab_size": 1, "layernorm_order": "pre", "model_parallel_size": 1,
            "max_sequence_length": (image_size // patch_size) ** 2 + 1, "inner_hidden_size": 4 * eva_hidden,
            "use_final_layernorm": False, "layernorm_epsilon": 1e-06, "image_size": [image_size, image_size],
            "pre_len": 1, "post_len": 0, "in_channels": 3, "num_classes": 0, "patch_size": patch_size,
        },
        "qformer_args": {
            "num_layers": qformer_layers, "hidden_size": qformer_hidden,
            "num_attention_heads": qformer_heads or max(1, qformer_hidden // 16), "vocab_size": image_length,
            "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
            "is_decoder": [i % 2 == 0 for i in range(qformer_layers)], "cross_attn_hidden_size": eva_hidden,
            "layernorm_epsilon": 1e-12,
        },
        "bos_token_id": bos_token_id,
        "mask_token_id": mask_token_id,
        "gmask_token_id": gmask_token_id,
        "pad_token_id": pad_token_id,
        **extra,
    }


def add_adapter_args(parser) -> None:
    """FineTuneVisualGLMModel's adapter flags (model/sat/finetune.py adds them through this)."""
    group = parser.add_argument_group("VisualGLM-finetune", "Adapter options (saved in model_config.json)")
    group.add_argument("--pre_seq_len", type=int, default=8, help="P-tuning v2 prefix length")
    group.add_argument("--lora_rank", type=int, default=10)
    group.add_argument("--use_ptuning", action="store_true")
    group.add_argument("--use_lora", action="store_true")
    group.add_argument("--use_qlora", action="store_true")
    group.add_argument("--layer_range", nargs="+", type=int, default=None,
                       help="GLM layers that get LoRA, as a list: '0 14' = layers 0 and 14 (default: all)")


def add_visualglm_args(parser) -> None:
    """VisualGLMModel's own flags (model/sat/visualglm.py adds them through this)."""
    group = parser.add_argument_group("VisualGLM", "VisualGLM Configurations")
    group.add_argument("--image_length", type=int, default=32)
    group.add_argument("--eva_args", type=json.loads, default={})
    group.add_argument("--qformer_args", type=json.loads, default={})


def add_finetune_model_args(parser) -> None:
    """Every flag FineTuneVisualGLMModel.add_model_specific_args adds, without importing sat: ours, then
    the token-id flags sat's ChatGLMModel adds (tests/test_readme.py checks that the two sets agree)."""
    add_adapter_args(parser)
    add_visualglm_args(parser)
    group = parser.add_argument_group("ChatGLM", "ChatGLM Configurations")
    for flag in ("--bos-token-id", "--mask-token-id", "--gmask-token-id", "--pad-token-id"):
        group.add_argument(flag, type=int)
