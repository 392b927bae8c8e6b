"""Loading, saving, the two qkv layouts, and clear errors for broken checkpoints."""
import json
import shutil

import pytest
import torch

from model.sat.checkpoint import (CheckpointError, build_model, load_model, qkv_blocks_to_head_first,
                              qkv_head_first_to_blocks, save_checkpoint)
from model.positions import batch_inputs


def logits(m, tiny_config, image=None):
    L = tiny_config["image_length"]
    seq = [20, 21] + [3] * L + [22, 23, 24, tiny_config["gmask_token_id"], tiny_config["bos_token_id"]]
    ids, pos, mask, _ = batch_inputs([seq], pad_id=3)
    kw = {} if image is None else dict(image=image, pre_image=2)
    with torch.no_grad():
        return m(ids, position_ids=pos, attention_mask=mask, **kw)[0]


@pytest.fixture()
def ckpt_copy(ckpt_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt_dir, dst)
    return dst


def state_file(d):
    return d / (d / "latest").read_text().strip() / "mp_rank_00_model_states.pt"


def test_round_trip_gives_identical_logits(ckpt_dir, tiny_config, tmp_path):
    a = load_model(str(ckpt_dir))
    image = torch.randn(1, 3, 224, 224)
    save_checkpoint(a, tmp_path / "again")
    b = load_model(str(tmp_path / "again"))
    assert torch.equal(logits(a, tiny_config, image), logits(b, tiny_config, image))
    assert all(not t.is_meta for t in b.state_dict().values())
    # the saved file loads under weights-only torch.load, holding just {'module': ...}
    raw = torch.load(state_file(tmp_path / "again"), weights_only=True)
    assert list(raw) == ["module"]


def test_qkv_permutation_round_trip_and_row_formula():
    nh, hd, hidden = 4, 8, 32
    w = torch.randn(3 * nh * hd, hidden)
    new = qkv_head_first_to_blocks(w, nh)
    assert torch.equal(qkv_blocks_to_head_first(new, nh), w)
    for h in range(nh):
        for p in range(3):
            for d in (0, hd - 1):  # old row h*3*hd + p*hd + d  ->  new row p*nh*hd + h*hd + d
                assert torch.equal(new[p * nh * hd + h * hd + d], w[h * 3 * hd + p * hd + d])
    b = torch.randn(3 * nh * hd)
    assert torch.equal(qkv_blocks_to_head_first(qkv_head_first_to_blocks(b, nh), nh), b)


def test_old_head_first_checkpoint_loads_to_the_same_model(ckpt_copy, ckpt_dir, tiny_config):
    """A mid-2023 file: GLM qkv rows per head and no pad_token_id in model_config.json."""
    path = state_file(ckpt_copy)
    sd = torch.load(path, weights_only=True)["module"]
    nh = tiny_config["num_attention_heads"]
    for k in list(sd):
        if k.startswith("transformer.layers.") and "query_key_value" in k:
            sd[k] = qkv_blocks_to_head_first(sd[k], nh)
    torch.save({"module": sd}, path)
    cfg = json.loads((ckpt_copy / "model_config.json").read_text())
    cfg.pop("pad_token_id")
    (ckpt_copy / "model_config.json").write_text(json.dumps(cfg))
    image = torch.randn(1, 3, 224, 224)
    ref = logits(load_model(str(ckpt_dir)), tiny_config, image)
    assert torch.allclose(logits(load_model(str(ckpt_copy)), tiny_config, image), ref, atol=1e-5)
    wrong = load_model(str(ckpt_copy), qkv_layout="blocks")  # forcing the wrong layout changes the answer
    assert not torch.allclose(logits(wrong, tiny_config, image), ref, atol=1e-2)


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SAT_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match="not found. Looked in") as e:
        load_model("no-such-model")
    assert str(tmp_path / "home" / "no-such-model") in str(e.value)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_model(str(tmp_path / "hf"))


def test_truncated_file_is_a_clear_error(ckpt_copy):
    path = state_file(ckpt_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_model(str(ckpt_copy))


def test_missing_latest_and_missing_file(ckpt_copy):
    path = state_file(ckpt_copy)
    path.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_model(str(ckpt_copy))
    (ckpt_copy / "latest").unlink()
    with pytest.raises(CheckpointError, match="latest"):
        load_model(str(ckpt_copy))


def test_wrong_shapes_name_keys_and_shapes(ckpt_copy, tiny_config):
    cfg = json.loads((ckpt_copy / "model_config.json").read_text())
    cfg["hidden_size"] = 2 * cfg["hidden_size"]
    (ckpt_copy / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(str(ckpt_copy))
    msg = str(e.value)
    h = tiny_config["hidden_size"]
    assert "shape mismatch" in msg and "refusing" in msg
    assert f"transformer.word_embeddings.weight: [{tiny_config['vocab_size']}, {h}] vs " \
           f"[{tiny_config['vocab_size']}, {2 * h}]" in msg


def test_missing_and_unexpected_keys_are_refused(ckpt_copy):
    path = state_file(ckpt_copy)
    sd = torch.load(path, weights_only=True)["module"]
    sd.pop("mixins.eva.model.glm_proj.bias")
    sd["transformer.layers.0.attention.surprise"] = torch.zeros(1)
    sd["transformer.position_embeddings.weight"] = torch.zeros(4, 4)  # present in released files: tolerated
    torch.save({"module": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(str(ckpt_copy))
    assert "glm_proj.bias" in str(e.value) and "surprise" in str(e.value)
    assert "position_embeddings" not in str(e.value)


def test_save_never_overwrites(ckpt_dir, tmp_path):
    m = load_model(str(ckpt_dir))
    out = save_checkpoint(m, tmp_path / "out")
    before = state_file(out).read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(m, out)
    assert state_file(out).read_bytes() == before


def test_sat_style_from_pretrained_and_sat_home(ckpt_dir, monkeypatch):
    from model.sat.visualglm import VisualGLMModel
    monkeypatch.setenv("SAT_HOME", str(ckpt_dir.parent))
    m, args = VisualGLMModel.from_pretrained(ckpt_dir.name)
    assert args.image_length == m.image_length and not m.training


def test_the_released_model_missing_points_to_the_bundled_one(tmp_path, monkeypatch):
    from model.sat import checkpoint
    monkeypatch.setenv("SAT_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve_checkpoint_dir("visualglm-6b", download=False)
    assert "--from_pretrained visualglm-tiny" in str(e.value) and "offline" in str(e.value)

    def no_network(name, path, url):
        raise ConnectionError("no route to the model zoo")
    import sat.resources
    monkeypatch.setattr(sat.resources, "auto_create", no_network)
    with pytest.raises(CheckpointError, match="Could not download") as e:
        checkpoint.resolve_checkpoint_dir("visualglm-6b")
    assert "--from_pretrained visualglm-tiny" in str(e.value)
    with pytest.raises(CheckpointError) as e:           # other names: nothing to suggest
        checkpoint.resolve_checkpoint_dir("my-finetune")
    assert "offline" not in str(e.value)


def test_large_checkpoints_show_progress_on_stderr(ckpt_dir, tiny_config, tmp_path, monkeypatch, capfd):
    """Reading and writing a checkpoint over the size limit (1 GiB: the 6B model's 16 GB) moves a byte
    bar on stderr; smaller ones (the limit lowered here to 0 bytes) stay silent, and stdout stays clean."""
    from model import progress
    model = load_model(str(ckpt_dir))
    save_checkpoint(model, tmp_path / "small")
    assert capfd.readouterr() == ("", "")
    monkeypatch.setattr(progress, "LARGE_CHECKPOINT_BYTES", 0)
    save_checkpoint(model, tmp_path / "large")
    again = load_model(str(tmp_path / "large"))
    out, err = capfd.readouterr()
    assert out == ""
    assert "Saving checkpoint: 100%" in err and "Loading large: 100%" in err
    assert torch.equal(logits(again, tiny_config), logits(model, tiny_config))   # the counted write is the file
