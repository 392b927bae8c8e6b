"""The Auto classes after `import model.hf`, without trust_remote_code: the tokenizer against the chat core's
(model/tokenizer.py), and a folder laid out like the released THUDM/visualglm-6b (model_type "chatglm",
auto_map to remote code, sharded pytorch_model-*.bin + index) built from a converted tiny checkpoint."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from model.convert import hf_to_sat, sat_to_hf
from model.hf import ChatGLMTokenizer, VisualGLMConfig, VisualGLMForConditionalGeneration
from model.hf.loading import load_hf_model_and_tokenizer
from model.sat.checkpoint import checkpoint_file, read_state_dict
from model.tokenizer import ChatGLMTokenizer as CoreTokenizer

TEXTS = ["你好 world!\n\t  多个   空格", "<img></img>问：这张图片的背景是什么颜色？\n答：红色。",
         "Describe the image." + " " * 100 + "end", "  leading spaces, trailing  ", "混合 English 和中文\n\n",
         "a literal [gMASK] and <sop> inside", ""]
REMOTE_CODE = 'raise RuntimeError("remote code was run")\n'


@pytest.fixture(scope="module")
def hf_dir(ckpt_dir, tmp_path_factory):
    return sat_to_hf(ckpt_dir, tmp_path_factory.mktemp("hf") / "visualglm-test-hf")


def test_autotokenizer_is_the_core_tokenizer(hf_dir, tmp_path):
    auto, core = AutoTokenizer.from_pretrained(hf_dir), CoreTokenizer.from_pretrained(hf_dir)
    assert isinstance(auto, ChatGLMTokenizer) and auto.padding_side == "left"
    for text in TEXTS:
        ids = core.encode(text)
        assert auto.encode(text) == ids and auto(text)["input_ids"] == ids, text
        assert auto.encode(text, add_special_tokens=False) == core.encode(text, add_special_tokens=False)
        assert auto.tokenize(text) == core.tokenize(text)
        assert auto.decode(ids) == core.decode(ids)
        assert auto.decode(ids, skip_special_tokens=True) == core.decode(ids, skip_special_tokens=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id",
                 "gmask_token_id", "eop_token_id"):
        assert getattr(auto, name) == getattr(core, name), name
    assert auto.vocab_size == core.vocab_size and auto.get_vocab() == core.get_vocab()
    batch = auto(TEXTS[:2], padding=True, return_tensors="pt")          # left padding, as ChatGLM does
    short = len(core.encode(TEXTS[0]))
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [core.pad_token_id] * (width - short) + core.encode(TEXTS[0])
    assert batch["attention_mask"][0].tolist() == [0] * (width - short) + [1] * short
    # save_pretrained / from_pretrained round trip, and the saved folder still loads in the core
    auto.save_pretrained(tmp_path / "tok")
    again, core_again = AutoTokenizer.from_pretrained(tmp_path / "tok"), CoreTokenizer.from_pretrained(tmp_path / "tok")
    assert all(again.encode(t) == core.encode(t) == core_again.encode(t) for t in TEXTS)


def released_folder(hf_dir, out):
    """hf_dir rewritten the way THUDM/visualglm-6b ships: remote-code config, three .bin shards + index."""
    out.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    for key in ("architectures", "dtype", "transformers_version", "model_type"):
        config.pop(key, None)
    auto = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage"}
    (out / "config.json").write_text(json.dumps(dict(config, _name_or_path="THUDM/visualglm-6b", model_type="chatglm",
                                                     architectures=["ChatGLMModel"], auto_map=auto,
                                                     torch_dtype="float16"), indent=2))
    tok = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tok, name_or_path="THUDM/visualglm-6b", tokenizer_class="ChatGLMTokenizer",
        auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}), indent=2))
    shutil.copy(hf_dir / "ice_text.model", out / "ice_text.model")
    for code in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "visual.py"):
        (out / code).write_text(REMOTE_CODE)
    state = load_file(hf_dir / "model.safetensors")
    keys, weight_map = list(state), {}
    for i, part in enumerate((keys[:40], keys[40:90], keys[90:])):
        name = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({k: state[k] for k in part}, out / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return out


def test_the_released_folder_layout_loads_without_remote_code(hf_dir, ckpt_dir, tmp_path, tiny_config):
    folder = released_folder(hf_dir, tmp_path / "visualglm-6b")
    config = AutoConfig.from_pretrained(folder)                  # no trust_remote_code: never asked, never run
    assert isinstance(config, VisualGLMConfig) and config.num_layers == tiny_config["num_layers"]
    assert isinstance(AutoTokenizer.from_pretrained(folder), ChatGLMTokenizer)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(model, VisualGLMForConditionalGeneration)
    expected = load_file(hf_dir / "model.safetensors")
    got = model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k].float()) for k in expected)
    # the *_hf.py loader takes it too, and the converter turns it back into the original sat checkpoint
    loaded, tok = load_hf_model_and_tokenizer(folder, device="cpu")
    assert tok.gmask_token_id == loaded.config.gmask_token_id
    greedy = dict(do_sample=False, max_new_tokens=8)                  # chat() takes either tokenizer
    assert loaded.chat(AutoTokenizer.from_pretrained(folder), "", "你好", **greedy) == loaded.chat(tok, "", "你好", **greedy)
    sat = read_state_dict(checkpoint_file(hf_to_sat(folder, tmp_path / "sat")))
    original = read_state_dict(checkpoint_file(ckpt_dir))
    original.pop("transformer.position_embeddings.weight", None)               # unused, not in HF files
    assert set(sat) == set(original) and all(torch.equal(sat[k], original[k]) for k in original)


def test_a_text_only_chatglm_folder_is_refused_clearly(hf_dir, tmp_path):
    folder = released_folder(hf_dir, tmp_path / "chatglm-6b")
    config = json.loads((folder / "config.json").read_text())
    del config["eva_config"], config["qformer_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a VisualGLM-6B folder"):
        AutoConfig.from_pretrained(folder)


def test_save_pretrained_writes_safetensors_and_a_plain_config(hf_dir, tmp_path):
    model = AutoModel.from_pretrained(hf_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    assert not list((tmp_path / "saved").glob("*.bin")) and not list((tmp_path / "saved").glob("*.py"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "visualglm" and "auto_map" not in config
    assert config["eva_config"] == model.config.eva_config and config["num_layers"] == model.config.num_layers
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(model.state_dict()) and all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert not torch.equal(saved["lm_head.weight"], saved["transformer.word_embeddings.weight"])    # not tied
    again = AutoModel.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    ids = torch.tensor([[20, 21, 22, model.config.gmask_token_id, model.config.bos_token_id]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
