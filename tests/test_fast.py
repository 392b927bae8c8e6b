"""The fast backend (model/fast) against the sat backend on a tiny random model, fp32 on the CPU."""
import copy

import pytest
import torch

from model.chat import ChatEngine
from model.fast import FastBackend
from model.fast.cache import CacheOverflow
from model.generation import Request, generate
from model.positions import batch_inputs
from model.sampling import SamplingParams
from model.sat.backend import SatBackend
from model.sat.checkpoint import build_model
from conftest import randomize


@pytest.fixture(scope="module")
def net(tiny_config):
    return randomize(build_model(tiny_config, device="cpu"), seed=3).eval()


def requests(cfg, emb):
    L, g, s = cfg["image_length"], cfg["gmask_token_id"], cfg["bos_token_id"]
    greedy = dict(top_k=1, repetition_penalty=1.3)
    return [Request(ids=[20, 21, 22, g, s], params=SamplingParams(max_length=30, **greedy)),
            Request(ids=[20, 21] + [3] * L + [25, 26, 27, 28, g, s], params=SamplingParams(max_length=70, **greedy),
                    image_embeds=emb, pre_image=2),
            Request(ids=[30, 31, 32, 33, 34, 35, 36, 37, g, s], params=SamplingParams(max_length=40, **greedy))]


def test_prefill_and_decode_logits_equal_the_sat_backend(net, tiny_config):
    emb = net.encode_image(torch.randn(2, 3, 224, 224))
    reqs = requests(tiny_config, emb[0])
    ids, pos, mask, pads = batch_inputs([r.ids for r in reqs], 3, dtype=torch.bool)
    pre = torch.tensor([-1, pads[1] + 2, -1])
    image = torch.stack([torch.zeros_like(emb[0]), emb[0], torch.zeros_like(emb[0])])
    ref_logits, ref_cache = SatBackend(net).prefill(ids, pos, mask, image, pre)
    fast = FastBackend(net)
    logits, cache = fast.prefill(ids, pos, mask, image, pre, capacity=70)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    tokens = ref_logits.argmax(-1, keepdim=True)
    step_pos = torch.stack([pos[:, 0, -1], pos[:, 1, -1] + 1], 1)[:, :, None]
    key_mask = torch.cat([mask[:, 0, -1], torch.ones(3, 1, dtype=torch.bool)], 1)
    ref_step, _ = SatBackend(net).decode_step(tokens, step_pos, key_mask, ref_cache)
    step, _ = fast.decode_step(tokens, step_pos, key_mask, cache)
    assert torch.allclose(step, ref_step, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_equal_the_sat_backend_for_a_mixed_batch(net, tiny_config):
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0]
    ref = list(generate(SatBackend(net), requests(tiny_config, emb), 3, []))
    fast = list(generate(FastBackend(net), requests(tiny_config, emb), 3, []))
    assert fast == ref
    assert sum(t is not None for step in ref for t in step) > 60      # the rows really generated


def test_two_turn_chat_with_an_image_is_the_same_on_both_backends(tiny, image_file):
    model, tok = tiny
    answers = []
    for backend in (SatBackend(model), FastBackend(model)):
        engine = ChatEngine(backend, tok)
        greedy = dict(top_k=1, max_length=600, max_new_tokens=40, repetition_penalty=1.3)
        r1, h, img = engine.chat(str(image_file), "描述这张图片。", **greedy)
        r2, h, _ = engine.chat(None, "背景是什么颜色？", history=h, image=img, **greedy)
        r3, _, _ = engine.chat(None, "Hello, who are you?", english=True, **greedy)   # text only
        answers.append((r1, r2, r3))
    assert answers[0] == answers[1] and all(answers[0])


def test_the_static_cache_refuses_to_overflow(net, tiny_config):
    fast = FastBackend(net)
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    ids, pos, mask, _ = batch_inputs([[20, 21, 22, g, s]], 3, dtype=torch.bool)
    logits, cache = fast.prefill(ids, pos, mask, capacity=8)
    assert cache.length == 256                                    # the smallest bucket
    with pytest.raises(CacheOverflow, match="past the 256"):
        fast.decode_step(torch.tensor([[5]]), pos[:, :, -1:], torch.ones(1, 257, dtype=torch.bool), cache)


def test_a_short_row_batched_with_a_long_one_can_use_all_of_its_max_length(net, tiny_config, monkeypatch):
    """Rows share cache slots after left padding: the cache must hold the long prompt plus everything
    the short row may still generate, not just the longest max_length."""
    from model.fast import backend as fast_backend
    monkeypatch.setattr(fast_backend, "MIN_CACHE", 16)                   # small buckets: a short test
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    short = Request(ids=[20, 21, g, s], params=SamplingParams(max_length=30, top_k=1))
    long = Request(ids=list(range(20, 38)) + [g, s], params=SamplingParams(max_length=21, top_k=1))
    steps = list(generate(FastBackend(net), [short, long], 3, []))       # no eos ids: rows run to max_length
    assert len(steps) == 30 - 4                                           # 20 + 26 slots, past 30's bucket (32)


def test_cache_lengths_come_in_few_sizes(net):
    fast = FastBackend(net)
    top = fast.max_sequence_length                                        # 2048
    lengths = [fast._bucket(n) for n in (1, 256, 257, top - 1, top, top + 1, top + top // 2 + 1, 2 * top)]
    assert lengths == [256, 256, 512, top, top, top + top // 2, 2 * top, 2 * top]


def test_a_newer_prefill_invalidates_the_older_cache(net, tiny_config):
    fast = FastBackend(net)
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    ids, pos, mask, _ = batch_inputs([[20, 21, g, s]], 3, dtype=torch.bool)
    _, old = fast.prefill(ids, pos, mask, capacity=8)
    fast.prefill(torch.cat([ids, ids]), torch.cat([pos, pos]), torch.cat([mask, mask]), capacity=8)
    with pytest.raises(RuntimeError, match="replaced"):
        fast.decode_step(torch.tensor([[5]]), pos[:, :, -1:], torch.ones(1, 5, dtype=torch.bool), old)


def test_cuda_graph_capture_needs_a_gpu(net):
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need an NVIDIA GPU; the GPU path is measured by benchmarks/bench_inference.py")
    fast = FastBackend(copy.deepcopy(net).cuda())     # a copy: .cuda() moves in place, and `net` is shared
    assert fast.cuda_graph


def test_auto_picks_the_sat_path_on_the_cpu_and_for_models_the_fast_path_cannot_run(net, tiny_config, monkeypatch):
    from model import backend as backend_module
    assert isinstance(backend_module.as_backend(net), SatBackend)                  # CPU: the reference path
    assert isinstance(backend_module.as_backend(net, "fast"), FastBackend)
    assert backend_module.as_backend(net, "fast") is backend_module.as_backend(net, "fast")   # built once
    with pytest.raises(ValueError, match="backend must be one of"):
        backend_module.as_backend(net, "turbo")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))        # as if on a GPU
    assert backend_module._fast_suits(net)
    ptuned = build_model(dict(tiny_config, model_class="FineTuneVisualGLMModel", use_ptuning=True, pre_seq_len=4),
                         device="cpu")
    assert not backend_module._fast_suits(ptuned), "P-tuning prefixes would be lost on the fast path"


def test_prompts_skip_cudnn_attention_and_decoding_keeps_the_default(net, tiny_config, monkeypatch):
    """cuDNN's attention plans every new shape (1.1-1.7 s for a prompt of a new length on an H200): the
    prefill of prompts runs with it off; one-token steps keep torch's default choice."""
    from model.fast import glm as fast_glm
    seen, real = [], fast_glm.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], torch.backends.cuda.cudnn_sdp_enabled()))
        return real(q, k, v, **kw)
    monkeypatch.setattr(fast_glm.F, "scaled_dot_product_attention", spy)
    default = torch.backends.cuda.cudnn_sdp_enabled()
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    list(generate(FastBackend(net), [Request(ids=[20, 21, 22, g, s], params=SamplingParams(max_length=8, top_k=1))],
                  3, []))
    assert {on for n, on in seen if n > 1} == {False} and {on for n, on in seen if n == 1} == {default}
    assert torch.backends.cuda.cudnn_sdp_enabled() == default
