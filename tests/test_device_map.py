"""--device-map (model/sat/device_map.py): parsing, which device each part gets, and on the CPU (the only
device here) a mapped model that answers exactly like the unmapped one, with its hooks in place."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.sat.device_map import DeviceMap, DeviceMapError, backend_for, layer_devices, parse_device_map

ROOT = Path(__file__).resolve().parent.parent


def test_parse():
    assert parse_device_map("vision=cpu,glm=cpu") == DeviceMap("cpu", [("cpu", None)])
    assert parse_device_map("glm=cpu+cpu") == DeviceMap("cpu", [("cpu", None), ("cpu", None)])   # vision follows
    assert parse_device_map(" vision = cpu ").glm == [("cpu", None)]                               # glm follows
    assert parse_device_map("glm=cpu*3+cpu*1").glm == [("cpu", 3), ("cpu", 1)]


@pytest.mark.parametrize("spec, message", [
    ("vision=cuda:0", "not available"),
    ("glm=cpu+cuda:1", "not available"),
    ("vision=tpu", "is not a device"),
    ("eva=cpu", "cannot read"),
    ("vision=cpu,vision=cpu", "given twice"),
    ("glm=cpu*2+cpu", "for every GLM device or for none"),
    ("glm=cpu*0", "positive number"),
    ("", "empty"),
])
def test_parse_errors(spec, message):
    if "cuda" in spec and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceMapError, match=message):
        parse_device_map(spec)


def test_layer_devices():
    two = DeviceMap("cuda:0", [("cuda:0", None), ("cuda:1", None)])
    assert layer_devices(two, 5) == ["cuda:0"] * 3 + ["cuda:1"] * 2
    counted = DeviceMap("cuda:0", [("cuda:0", 1), ("cuda:1", 4)])
    assert layer_devices(counted, 5) == ["cuda:0"] + ["cuda:1"] * 4
    with pytest.raises(DeviceMapError, match="add up to 5, but the model has 4"):
        layer_devices(counted, 4)


def test_backend_for():
    assert backend_for(None, "fast") == "fast"
    assert backend_for("vision=cpu", "auto") == "sat"
    with pytest.raises(DeviceMapError, match="--backend fast"):
        backend_for("vision=cpu", "fast")


def test_mapped_model_answers_like_the_plain_one(ckpt_dir, tiny, image_file):
    """All parts on the CPU: every hook runs (and moves nothing), so the answers must be unchanged."""
    from model.chat import ChatEngine
    from model.sat.loading import load_model_and_tokenizer
    plain, tok = tiny
    mapped, _ = load_model_and_tokenizer(str(ckpt_dir), device_map="vision=cpu,glm=cpu*1+cpu*1")
    layers = mapped.transformer.layers
    assert all(p.device.type == "cpu" for p in mapped.parameters())
    assert all(layer.attention._forward_pre_hooks and layer.input_layernorm._forward_pre_hooks for layer in layers)
    assert mapped.get_mixin("eva").model._forward_hooks and mapped.transformer.word_embeddings._forward_pre_hooks
    assert set(mapped.get_mixin("chatglm-attn").rotary_emb.copies) == {"on_cpu"}
    for kw in (dict(image_path=image_file), dict(image_path=None)):
        a = ChatEngine(plain, tok, backend="sat").chat(query="What is it?", top_k=1, max_length=120, **kw)
        b = ChatEngine(mapped, tok, backend="sat").chat(query="What is it?", top_k=1, max_length=120, **kw)
        assert a[0] == b[0] and len(a[0]) > 0
        if kw["image_path"] is not None:
            torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)


def test_cli_demo_says_what_is_wrong_with_a_device_map(ckpt_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, str(ROOT / "cli_demo.py"), "--from_pretrained", str(ckpt_dir),
                          "--device-map", "vision=cuda:0,glm=cuda:1"], input="", capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "is not available (this machine has 0 CUDA GPU(s))" in out.stderr


def test_server_loader_takes_a_device_map(ckpt_dir):
    """api.py and web_demo.py load through sat_engine_loader: the map reaches the model, mistakes are a
    ModelLoadError (the server reports it and exits), not a traceback."""
    from serving.cli import sat_engine_loader
    from serving.errors import ModelLoadError
    engine = sat_engine_loader(str(ckpt_dir), device_map="vision=cpu,glm=cpu")()
    assert engine.model.device_map.glm == [("cpu", None)] and type(engine.backend).__name__ == "SatBackend"
    with pytest.raises(ModelLoadError, match="cannot read 'gpu=cpu'"):
        sat_engine_loader(str(ckpt_dir), device_map="gpu=cpu")()
