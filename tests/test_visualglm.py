"""The model's structure against the released checkpoint's manifest, and the image splice."""
from pathlib import Path

import torch

from model.sat.checkpoint import build_model
from model.configs import VISUALGLM_6B
from conftest import randomize

MANIFEST = Path(__file__).parent / "data" / "sat-keys-visualglm-6b.tsv"


def test_full_size_names_and_shapes_match_released_checkpoint():
    m = build_model(VISUALGLM_6B, device="meta", dtype=torch.float16)  # no memory is allocated
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {}
    for line in MANIFEST.read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        expected[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    assert len(expected) == 1012
    assert sorted(got) == sorted(expected)
    assert {k: got[k] for k in expected} == expected
    params = sum(p.numel() for p in m.parameters())
    assert params == 7_802_193_408


def test_full_size_sizes_come_from_config():
    cfg = dict(VISUALGLM_6B, num_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=1000,
               eva_args=dict(VISUALGLM_6B["eva_args"], num_layers=1),
               qformer_args=dict(VISUALGLM_6B["qformer_args"], num_layers=2, is_decoder=[True, False]))
    m = build_model(cfg, device="meta")
    sd = m.state_dict()
    assert sd["mixins.eva.model.glm_proj.weight"].shape == (256, 768)
    assert sd["transformer.layers.0.attention.query_key_value.weight"].shape == (768, 256)


def test_image_embeddings_replace_placeholder_slots(tiny_config):
    m = randomize(build_model(tiny_config, device="cpu")).eval()
    L = tiny_config["image_length"]
    ids = torch.randint(20, 100, (1, 2 + L + 5))
    captured = {}
    layer0 = m.transformer.layers[0]
    handle = layer0.input_layernorm.register_forward_hook(lambda mod, inp, out: captured.setdefault("x", inp[0]))
    with torch.no_grad():
        pixels = torch.randn(1, 3, 224, 224)
        emb = m.encode_image(pixels)
        assert emb.shape == (1, L, tiny_config["hidden_size"])
        m(ids, position_ids=torch.zeros(1, 2, ids.shape[1], dtype=torch.long),
          attention_mask=torch.ones(1, 1, ids.shape[1], ids.shape[1]), image=pixels, pre_image=2)
    handle.remove()
    x = captured["x"][0]
    words = m.transformer.word_embeddings.weight
    assert torch.allclose(x[2:2 + L], emb[0], atol=1e-6)              # the image fills the slots
    assert torch.allclose(x[:2], words[ids[0, :2]])                    # text around it is untouched
    assert torch.allclose(x[2 + L:], words[ids[0, 2 + L:]])


def test_image_changes_logits_and_text_only_path_works(tiny_config):
    m = randomize(build_model(tiny_config, device="cpu")).eval()
    n = 2 + tiny_config["image_length"] + 4
    ids = torch.randint(20, 100, (1, n))
    kw = dict(position_ids=torch.zeros(1, 2, n, dtype=torch.long), attention_mask=torch.ones(1, 1, n, n))
    with torch.no_grad():
        text = m(ids, **kw)[0]
        a = m(ids, image=torch.randn(1, 3, 224, 224), pre_image=2, **kw)[0]
        b = m(ids, image=torch.randn(1, 3, 224, 224), pre_image=2, **kw)[0]
    assert not torch.allclose(a, text) and not torch.allclose(a, b)


def test_forward_matches_independent_reference(tiny_config):
    """Our sat-based model against tests/reference.py, written from the spec on the raw state dict."""
    from model.positions import batch_inputs
    import reference
    m = randomize(build_model(tiny_config, device="cpu"), seed=3).eval()
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    L = tiny_config["image_length"]
    ids = [20, 21] + [3] * L + [22, 23, 24, 25, tiny_config["gmask_token_id"], tiny_config["bos_token_id"]]
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref_image = reference.vision(sd, tiny_config, pixels[0])
        assert torch.allclose(m.encode_image(pixels)[0], ref_image, atol=1e-4)
        t, pos, mask, _ = batch_inputs([ids], pad_id=3)
        ours = m(t, position_ids=pos, attention_mask=mask, image=pixels, pre_image=2)[0][0]
        ref = reference.glm_logits(sd, tiny_config, ids, ref_image, pre_image=2)
        assert ours.abs().max() > 0.1
        assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
        text_ids = [30, 31, 32, tiny_config["gmask_token_id"], tiny_config["bos_token_id"]]
        t, pos, mask, _ = batch_inputs([text_ids], pad_id=3)
        assert torch.allclose(m(t, position_ids=pos, attention_mask=mask)[0][0],
                              reference.glm_logits(sd, tiny_config, text_ids), atol=1e-4)
