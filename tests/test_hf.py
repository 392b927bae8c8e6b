"""The Hugging Face flavour (model/hf) and the converter (model/convert.py) against the sat model and the
independent reference forward (tests/reference.py), on tiny models in fp32 on the CPU."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import reference
from model.chat import ChatEngine
from model.configs import VISUALGLM_6B
from model.convert import ConvertError, hf_to_sat, main as convert_main, sat_state_to_hf, sat_to_hf
from model.generation import Request, generate
from model.hf.modeling import CACHE_FIELD
from model.hf import HFBackend, VisualGLMConfig, VisualGLMForConditionalGeneration
from model.positions import batch_inputs
from model.sampling import SamplingParams
from model.sat.backend import SatBackend
from model.sat.checkpoint import checkpoint_file, read_config, read_state_dict
from model.sat.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "pretrained" / "visualglm-tiny"
MANIFEST = Path(__file__).parent / "data" / "sat-keys-visualglm-6b.tsv"


@pytest.fixture(scope="module")
def hf_dir(ckpt_dir, tmp_path_factory):
    return sat_to_hf(ckpt_dir, tmp_path_factory.mktemp("hf") / "visualglm-test-hf")


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return VisualGLMForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


def sat_logits(model, ids, pos, mask, pixels=None, pre_image=None):
    kw = {} if pixels is None else dict(image=pixels, pre_image=pre_image)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, attention_mask=mask.float(), **kw)[0]


def prompt(cfg, image: bool):
    g, s, L = cfg["gmask_token_id"], cfg["bos_token_id"], cfg["image_length"]
    return [20, 21] + [3] * L + [25, 26, 27, g, s] if image else [30, 31, 32, 33, g, s]


@pytest.mark.parametrize("image", [False, True])
def test_hf_logits_equal_the_sat_model_and_the_reference(tiny, hf_model, tiny_config, ckpt_dir, image):
    sat_model, _ = tiny
    ids = prompt(tiny_config, image)
    x, pos, mask, _ = batch_inputs([ids], 3, dtype=torch.bool)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)) if image else None
    expected = sat_logits(sat_model, x, pos, mask, pixels, 2)
    with torch.no_grad():
        got = hf_model(x, position_ids=pos, attention_mask=~mask, pixel_values=pixels, pre_image_length=2).logits
        built = hf_model(x, pixel_values=pixels, pre_image_length=2).logits     # positions/mask from the ids
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(built, got)
    sd = read_state_dict(checkpoint_file(ckpt_dir))
    emb = reference.vision(sd, tiny_config, pixels[0]) if image else None
    ref = reference.glm_logits(sd, tiny_config, ids, emb, pre_image=2)
    assert torch.allclose(got[0], ref, atol=1e-4, rtol=1e-4)


def test_the_bundled_model_converted_gives_the_sat_logits(tmp_path):
    """The bundled model differs from the test config (pre-LN Q-Former, cross-attention in every layer,
    fp16 weights): the image path must agree there too."""
    sat_model, tok = load_model_and_tokenizer(str(BUNDLED), device="cpu")
    hf = VisualGLMForConditionalGeneration.from_pretrained(sat_to_hf(BUNDLED, tmp_path / "hf"), dtype=torch.float32)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = hf.encode_image(pixels), sat_model.encode_image(pixels)
    # fp32 rounding of two orders of summation through 7 attention blocks: within 1e-5 of the output's scale
    # (the shipped model's outputs reach |16|; measured 3.7e-6 of it)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def test_cached_decoding_equals_a_full_pass(hf_model, tiny_config):
    ids = prompt(tiny_config, True) + [40, 41, 42]
    x, _, _, _ = batch_inputs([ids[:-3]], 3, dtype=torch.bool)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        full = hf_model(torch.tensor([ids]), pixel_values=pixels, pre_image_length=2).logits
        out = hf_model(x, pixel_values=pixels, pre_image_length=2)
        cache = getattr(out, CACHE_FIELD)      # `cache` or `past_key_values`, by transformers version
        c = len(ids) - 4                                      # index of <sop>
        for n, token in enumerate(ids[-3:]):
            step = hf_model(torch.tensor([[token]]), position_ids=torch.tensor([[[c - 1], [n + 2]]]), cache=cache)
            cache = getattr(step, CACHE_FIELD)
            assert torch.allclose(step.logits[0, -1], full[0, c + 1 + n], atol=1e-5, rtol=1e-5)


def test_greedy_two_turn_chat_is_the_same_on_hf_and_sat(tiny, hf_model, image_file, tiny_config):
    sat_model, tok = tiny
    greedy = dict(max_length=600, top_k=1, repetition_penalty=1.3)
    # the decoding loop: 32+ tokens of one request, token for token
    emb = ChatEngine(SatBackend(sat_model), tok).encode_image(str(image_file))[0]
    req = lambda: [Request(ids=prompt(tiny_config, True), image_embeds=emb, pre_image=2,
                           params=SamplingParams(max_new_tokens=40, **greedy))]
    sat_tokens = list(generate(SatBackend(sat_model), req(), 3, []))
    assert len(sat_tokens) == 40 and list(generate(HFBackend(hf_model), req(), 3, [])) == sat_tokens
    # upstream's HF chat() against the sat chat(), two turns about an image
    kw = dict(greedy, max_new_tokens=40)
    r1, h1 = hf_model.chat(tok, str(image_file), "描述这张图片。", history=[], do_sample=False, **kw)
    r2, h2 = hf_model.chat(tok, str(image_file), "背景是什么颜色？", history=h1, do_sample=False, **kw)
    engine = ChatEngine(SatBackend(sat_model), tok)
    s1, g1, img = engine.chat(str(image_file), "描述这张图片。", history=[], **kw)
    s2, g2, _ = engine.chat(None, "背景是什么颜色？", history=g1, image=img, **kw)
    assert (r1, r2, h2) == (s1, s2, g2) and r1 and r2
    streamed = list(hf_model.stream_chat(tok, "", "Hello, who are you?", do_sample=False, **kw))
    assert streamed[-1][1] == [("Hello, who are you?", streamed[-1][0])] and len(streamed) > 1


def test_sat_to_hf_to_sat_is_bit_exact(tmp_path):
    hf = sat_to_hf(BUNDLED, tmp_path / "hf")
    back = hf_to_sat(hf, tmp_path / "sat")
    a, b = read_state_dict(checkpoint_file(BUNDLED)), read_state_dict(checkpoint_file(back))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ca, cb = read_config(BUNDLED), read_config(back)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size", "image_length",
                "eva_args", "qformer_args", "bos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
        assert ca[key] == cb[key], key
    assert (back / "ice_text.model").read_bytes() == (BUNDLED / "ice_text.model").read_bytes()
    # the converted qkv really is reordered (per head), everything else is the same tensor
    from safetensors.torch import load_file
    h = load_file(hf / "model.safetensors")
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    assert not torch.equal(h[qkv], a[qkv]) and torch.equal(h["lm_head.weight"], a["mixins.chatglm-final.lm_head.weight"])


def test_full_size_hf_key_manifest_on_the_meta_device():
    with torch.device("meta"):
        model = VisualGLMForConditionalGeneration(VisualGLMConfig())
    hf = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(hf) == 1039                                            # spec 2.3: 368 GLM + 671 vision
    assert sum(p.numel() for p in model.parameters()) == 7_802_193_408
    sat = {}
    for line in MANIFEST.read_text().splitlines():
        key, shape, _ = line.split("\t")
        sat[key] = torch.empty(eval(shape), device="meta")
    converted = {k: tuple(v.shape) for k, v in sat_state_to_hf(sat, VISUALGLM_6B).items()}
    assert converted == hf


def test_automodel_loads_a_converted_folder_without_remote_code(hf_dir):
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.from_pretrained(hf_dir)
    assert isinstance(config, VisualGLMConfig) and "auto_map" not in json.loads((hf_dir / "config.json").read_text())
    model = AutoModel.from_pretrained(hf_dir, dtype=torch.float32)
    assert isinstance(model, VisualGLMForConditionalGeneration)
    ref = VisualGLMForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_converter_refuses_to_overwrite_and_refuses_adapters(ckpt_dir, hf_dir, tmp_path, capsys):
    assert convert_main(["sat-to-hf", str(ckpt_dir), str(hf_dir)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    lora = tmp_path / "lora"
    shutil.copytree(ckpt_dir, lora)
    config = json.loads((lora / "model_config.json").read_text())
    (lora / "model_config.json").write_text(json.dumps(dict(config, model_class="FineTuneVisualGLMModel", use_lora=True)))
    with pytest.raises(ConvertError, match="python -m model.sat.merge_lora"):
        sat_to_hf(lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_gives_the_sat_quantized_logits(hf_dir, ckpt_dir, tiny_config, bits, tmp_path):
    from model.sat.loading import load_model_and_tokenizer
    from model.sat.quantization import quantize
    sat_model, _ = load_model_and_tokenizer(str(ckpt_dir), device="cpu")
    quantize(sat_model, bits)
    hf = VisualGLMForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).quantize(bits)
    qkv = hf.transformer.layers[0].attention.query_key_value
    assert qkv.weight.dtype == torch.int8 and qkv.weight.shape[1] == tiny_config["hidden_size"] // (8 // bits)
    x, pos, mask, _ = batch_inputs([prompt(tiny_config, False)], 3, dtype=torch.bool)
    with torch.no_grad():
        got = hf(x, position_ids=pos, attention_mask=~mask).logits
    expected = sat_logits(sat_model, x, pos, mask)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        unquantized = VisualGLMForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)(x).logits
    assert (unquantized - expected).abs().max() > 1e-3            # the comparison does see quantization
    with pytest.raises(ValueError, match="quantize.bits. after loading"):
        hf.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_an_old_generation_sat_file_converts_to_the_same_weights(ckpt_dir, hf_dir, tmp_path, tiny_config):
    """Files from before July 2023 keep the GLM qkv rows head-first and lack pad_token_id (spec 1.3)."""
    from model.sat.checkpoint import qkv_blocks_to_head_first
    old = tmp_path / "old"
    shutil.copytree(ckpt_dir, old)
    config = json.loads((old / "model_config.json").read_text())
    del config["pad_token_id"]
    (old / "model_config.json").write_text(json.dumps(config))
    state = read_state_dict(checkpoint_file(ckpt_dir))           # (memory-mapped: not the file rewritten below)
    heads = tiny_config["num_attention_heads"]
    torch.save({"module": {k: qkv_blocks_to_head_first(v, heads) if k.startswith("transformer.layers.")
                           and ".query_key_value." in k else v for k, v in state.items()}}, checkpoint_file(old))
    from safetensors.torch import load_file
    new, converted = load_file(hf_dir / "model.safetensors"), load_file(sat_to_hf(old, tmp_path / "hf") / "model.safetensors")
    assert set(new) == set(converted) and all(torch.equal(new[k], converted[k]) for k in new)


def test_a_merged_lora_fine_tune_converts_and_keeps_its_logits(ckpt_dir, tiny_config, tmp_path):
    from model.sat.checkpoint import load_model, save_checkpoint
    from model.sat.finetune import is_adapter_key
    from model.sat.merge_lora import merge_lora
    lora = load_model(str(ckpt_dir), overwrite_config={"model_class": "FineTuneVisualGLMModel", "use_lora": True,
                                                       "lora_rank": 4}, allow_missing=is_adapter_key)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "matrix_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    run = save_checkpoint(lora, tmp_path / "run", config=dict(lora.config))
    for f in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(ckpt_dir / f, run / f)
    with pytest.raises(ConvertError, match="python -m model.sat.merge_lora"):
        sat_to_hf(run, tmp_path / "refused")
    hf = VisualGLMForConditionalGeneration.from_pretrained(sat_to_hf(merge_lora(run, tmp_path / "merged"), tmp_path / "hf"),
                                                           dtype=torch.float32)
    x, pos, mask, _ = batch_inputs([prompt(tiny_config, False)], 3, dtype=torch.bool)
    with torch.no_grad():
        got = hf(x, position_ids=pos, attention_mask=~mask).logits
    assert torch.allclose(got, sat_logits(lora, x, pos, mask), atol=1e-4, rtol=0)     # the fine-tune, not the base
    assert not torch.allclose(got, hf_logits_of(ckpt_dir, tmp_path / "base", x, pos, mask), atol=1e-3)


def hf_logits_of(sat_dir, out, x, pos, mask):
    model = VisualGLMForConditionalGeneration.from_pretrained(sat_to_hf(sat_dir, out), dtype=torch.float32)
    with torch.no_grad():
        return model(x, position_ids=pos, attention_mask=~mask).logits
