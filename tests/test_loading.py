"""load_model_and_tokenizer: quantized loading, tokenizer lookup and mismatches."""
import json
import shutil

import pytest
import torch

from model.chat import chat
from model.sat.checkpoint import CheckpointError
from model.sat.loading import find_tokenizer_dir, load_model_and_tokenizer
from model.sat.quantization import QuantizedLinear


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_load_chats_like_the_float_model(ckpt_dir, image_file, bits, tiny):
    fmodel, tok = tiny
    qmodel, qtok = load_model_and_tokenizer(str(ckpt_dir), device="cpu", quant=bits)
    glm_linears = [m for m in qmodel.transformer.modules() if isinstance(m, QuantizedLinear)]
    assert len(glm_linears) == 4 * qmodel.config["num_layers"]
    kw = dict(top_k=1, max_length=80, repetition_penalty=1.0)
    img = fmodel.encode_image(torch.zeros(1, 3, 224, 224))  # vision tower is not quantized: same embeddings
    assert torch.allclose(img, qmodel.encode_image(torch.zeros(1, 3, 224, 224)), atol=1e-6)
    r, _, _ = chat(str(image_file), qmodel, qtok, "描述这张图片。", **kw)
    assert isinstance(r, str)


def test_tokenizer_lookup_and_errors(ckpt_dir, tmp_path, tokenizer_dir, monkeypatch):
    assert find_tokenizer_dir(ckpt_dir) == ckpt_dir
    bare = tmp_path / "bare"
    shutil.copytree(ckpt_dir, bare)
    for f in ("ice_text.model", "tokenizer_config.json"):
        (bare / f).unlink()
    monkeypatch.setenv("SAT_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match="No tokenizer found"):
        load_model_and_tokenizer(str(bare), device="cpu")
    model, tok = load_model_and_tokenizer(str(bare), device="cpu", tokenizer=str(tokenizer_dir))
    assert tok.pad_token_id == model.config["pad_token_id"]
    # a tokenizer whose special ids disagree with the model config is refused
    cfg = json.loads((bare / "model_config.json").read_text())
    cfg["gmask_token_id"] = cfg["gmask_token_id"] + 1
    (bare / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong tokenizer"):
        load_model_and_tokenizer(str(bare), device="cpu", tokenizer=str(tokenizer_dir))
