"""--quant on the fast path (model/fast/load.py): quantizing onto a device one matrix at a time computes what
quantizing in place does, the loader hands the result to the chat engine, and which path quantizes
for each (device, backend, quant). The target device is the CPU here; the GPU run is the benchmark's."""
import pytest
import torch

from model.backend import as_backend
from model.chat import ChatEngine
from model.fast import FastBackend
from model.fast import quant as fast_quant
from model.fast.load import fast_quantizes, quantize_onto
from model.positions import batch_inputs
from model.sat.checkpoint import build_model
from conftest import randomize


def twins(tiny_config, seed=4):
    a = randomize(build_model(tiny_config, device="cpu"), seed=seed).eval()
    b = build_model(tiny_config, device="cpu").eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_onto_a_device_gives_the_logits_of_quantizing_in_place(tiny_config, bits):
    in_place, loaded = twins(tiny_config)
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    args = batch_inputs([[20, 21, 22, 23, g, s], [30, 31, g, s]], 3, dtype=torch.bool)[:3]
    expected, _ = FastBackend(in_place, quant=bits).prefill(*args, capacity=32)
    backend = quantize_onto(loaded, bits, "cpu")
    logits, _ = backend.prefill(*args, capacity=32)
    assert torch.equal(logits, expected)
    assert as_backend(loaded, "fast") is backend                      # the engine gets this one, not a new one
    assert all(layer.attention.query_key_value.weight.numel() == 0 for layer in loaded.transformer.layers)
    assert loaded.mixins["chatglm-final"].lm_head.weight.numel() == 0  # the float GLM is gone from the model


def test_each_float_matrix_is_released_before_the_next_is_copied(tiny_config, monkeypatch):
    """What keeps the GPU from holding the float GLM: copy, quantize, release, one matrix at a time."""
    events = []
    real = fast_quant.LAYERS[8]
    monkeypatch.setitem(fast_quant.LAYERS, 8, lambda w, b: events.append("quantize") or real(w, b))
    net, _ = twins(tiny_config)
    glm = FastBackend(net).glm
    fast_quant.quantize_glm(glm, 8, release=lambda w: events.append("release"), device="cpu")
    matrices = 4 * tiny_config["num_layers"] + 1                      # 4 per block and the LM head
    assert events == ["quantize", "release"] * matrices


@pytest.mark.parametrize("device, backend, quant, mixins, fast", [
    ("cuda", "auto", 4, (), True),
    ("cuda:1", "fast", 8, (), True),
    ("cuda", "sat", 4, (), False),                        # the reference path keeps sat's quantization
    ("cpu", "auto", 8, (), False),                        # the CPU keeps today's behaviour
    ("cpu", "fast", 4, (), False),
    ("cuda", "auto", None, (), False),                    # nothing to quantize
    ("cuda", None, 4, (), False),                         # a caller that does not say which backend runs
    ("cuda", "auto", 4, ("chatglm-final", "lora"), False),   # auto leaves adapters to sat
    ("cuda", "fast", 4, ("chatglm-final", "lora"), True),    # as as_backend(model, "fast") does
])
def test_which_path_quantizes(device, backend, quant, mixins, fast):
    assert fast_quantizes(device, backend, quant, mixins) is fast


def test_the_loader_gives_the_chat_engine_the_backend_it_quantized(ckpt_dir, monkeypatch):
    """The loader's fast branch, pointed at the CPU (what it does with cuda on a GPU), end to end: the
    front ends pass --backend to the loader and to ChatEngine, and the engine runs the quantized GLM."""
    from model.fast import load as fast_load
    from model.sat.loading import load_model_and_tokenizer
    monkeypatch.setattr(fast_load, "fast_quantizes", lambda *a: True)
    model, tok = load_model_and_tokenizer(str(ckpt_dir), device="cpu", quant=4, backend="fast")
    engine = ChatEngine(model, tok, backend="fast")
    assert isinstance(engine.backend, FastBackend)
    assert isinstance(engine.backend.glm.blocks[0].qkv, fast_quant.Int4Linear)
    reference, _ = load_model_and_tokenizer(str(ckpt_dir), device="cpu")
    expected = ChatEngine(FastBackend(reference, quant=4), tok)
    greedy = dict(top_k=1, max_length=120, max_new_tokens=12)
    assert engine.chat(None, "你好，请问你是谁？", **greedy)[0] == expected.chat(None, "你好，请问你是谁？", **greedy)[0]


def test_the_servers_loader_passes_backend_to_the_loader(ckpt_dir, monkeypatch):
    """api.py and web_demo.py load through serving.cli.sat_engine_loader: --quant with --backend fast
    reaches the fast path's quantization (pointed at the CPU here, as above)."""
    from model.fast import load as fast_load
    from serving.cli import sat_engine_loader
    monkeypatch.setattr(fast_load, "fast_quantizes", lambda device, backend, quant, mixins: backend == "fast")
    engine = sat_engine_loader(str(ckpt_dir), device="cpu", quant=8, backend="fast")()
    assert isinstance(engine.backend.glm.blocks[0].qkv, fast_quant.Int8Linear)


def test_the_loader_quantizes_with_sat_on_the_cpu(ckpt_dir):
    from model.sat.loading import load_model_and_tokenizer
    from model.sat.quantization import QuantizedLinear
    model, _ = load_model_and_tokenizer(str(ckpt_dir), device="cpu", quant=8, backend="auto")
    assert isinstance(model.transformer.layers[0].attention.query_key_value, QuantizedLinear)
    assert not isinstance(as_backend(model, "auto"), FastBackend)
