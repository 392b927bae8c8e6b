"""The parts of the fast path that CUDA graphs replay, checked eagerly on the CPU: prefill padded to a
length bucket (model/fast/prefill.py) and the plain-torch image encoder over the model's own tensors
(model/fast/vision.py). The captures themselves need a GPU and skip here with a message."""
import contextlib

import pytest
import torch

from model.fast import FastBackend
from model.fast.prefill import BUCKETS, bucket_for
from model.fast.vision import shared_image_encoder
from model.generation import Request, generate
from model.positions import batch_inputs
from model.sampling import SamplingParams
from model.sat.backend import SatBackend
from model.sat.checkpoint import build_model
from conftest import randomize

NO_GPU = "CUDA graph capture needs an NVIDIA GPU; benchmarks/bench_inference.py runs these paths there"


@pytest.fixture(scope="module")
def net(tiny_config):
    return randomize(build_model(tiny_config, device="cpu"), seed=5).eval()


def mixed_batch(cfg, emb, prompt_tokens=(5, 40, 10)):
    """Rows of different lengths, one with an image; greedy with a repetition penalty."""
    L, g, s = cfg["image_length"], cfg["gmask_token_id"], cfg["bos_token_id"]
    greedy = dict(top_k=1, repetition_penalty=1.3, max_new_tokens=25)
    a, b, c = ([20 + i % 400 for i in range(n)] for n in prompt_tokens)
    n = max(prompt_tokens)                                                  # room for ~30 new tokens a row
    return [Request(ids=a + [g, s], params=SamplingParams(max_length=n + 40, **greedy)),
            Request(ids=[20, 21] + [3] * L + b + [g, s], params=SamplingParams(max_length=n + 80, **greedy),
                    image_embeds=emb, pre_image=2),
            Request(ids=c + [g, s], params=SamplingParams(max_length=n + 60, **greedy))]


def test_bucket_choice():
    assert [bucket_for(n, 2048) for n in (1, 64, 65, 200, 512)] == [64, 64, 128, 256, 512]
    assert bucket_for(BUCKETS[-1] + 1, 2048) is None                       # long prompts: eager
    assert bucket_for(200, 128) is None                                     # the bucket must fit the cache


def test_a_prompt_padded_to_its_bucket_gives_the_unpadded_logits_and_cache(net, tiny_config):
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0]
    reqs = mixed_batch(tiny_config, emb)
    ids, pos, mask, pads = batch_inputs([r.ids for r in reqs], 3, dtype=torch.bool)
    S = ids.shape[1]
    assert bucket_for(S, 256) == 128 and S < 128                          # really padded
    pre = torch.tensor([-1, pads[1] + 2, -1])
    image = torch.stack([torch.zeros_like(emb), emb, torch.zeros_like(emb)])
    plain, padded = FastBackend(net, buckets=False), FastBackend(net, buckets=True)
    want, want_cache = plain.prefill(ids, pos, mask, image, pre, capacity=120)
    got, cache = padded.prefill(ids, pos, mask, image, pre, capacity=120)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for k, v, wk, wv in zip(cache.k, cache.v, want_cache.k, want_cache.v):
        real = mask[:, 0, -1]                                             # [B, S] slots of real tokens
        assert torch.allclose(k[:, :, :S].transpose(1, 2)[real], wk[:, :, :S].transpose(1, 2)[real], atol=1e-5)
        assert torch.allclose(v[:, :, :S].transpose(1, 2)[real], wv[:, :, :S].transpose(1, 2)[real], atol=1e-5)


@pytest.mark.parametrize("prompt_tokens", [(5, 40, 10), (5, 520, 10)])   # bucketed; too long: eager
def test_greedy_tokens_after_a_bucketed_prefill_equal_the_sat_backend(net, tiny_config, prompt_tokens):
    """Decoding overwrites the pads' cache slots one by one: the tokens are still the reference's."""
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0]
    ref = list(generate(SatBackend(net), mixed_batch(tiny_config, emb, prompt_tokens), 3, []))
    fast = list(generate(FastBackend(net, buckets=True), mixed_batch(tiny_config, emb, prompt_tokens), 3, []))
    assert fast == ref
    assert sum(t is not None for step in ref for t in step) > 60


def test_the_plain_image_encoder_shares_the_weights_and_computes_sat_s(net):
    encoder = shared_image_encoder(net)
    sat_params = {id(p) for p in net.get_mixin("eva").model.parameters()}
    assert all(id(p) in sat_params for p in encoder.parameters())          # the same tensors, nothing copied
    pixels = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        want = net.encode_image(pixels)
        assert torch.allclose(encoder(pixels), want, atol=1e-5, rtol=1e-4)
        assert torch.allclose(FastBackend(net).encode_image(pixels), want, atol=1e-5, rtol=1e-4)


def test_a_model_the_plain_encoder_does_not_know_falls_back_to_sat_s_encoder(net, tiny_config, caplog):
    other = build_model(tiny_config, device="cpu").eval()
    other.get_mixin("eva").model.extra = torch.nn.Linear(2, 2)               # a tensor model/hf has no name for
    backend = FastBackend(other)
    assert backend.vision is None and "sat's eager one" in caplog.text
    assert backend.encode_image(torch.randn(1, 3, 224, 224)).shape == (1, tiny_config["image_length"], 64)


def test_a_failed_capture_falls_back_to_the_eager_run(net, tiny_config, caplog):
    """Capturing needs CUDA: asked for on the CPU, it fails, and both parts warn once and run eagerly."""
    from model.fast.prefill import BucketedPrefill
    from model.fast.vision import FastImageEncoder
    pixels = torch.randn(2, 3, 224, 224)
    encoder = FastImageEncoder(shared_image_encoder(net), capture=True)
    with torch.no_grad():
        assert torch.allclose(encoder(pixels), net.encode_image(pixels), atol=1e-5, rtol=1e-4)
    assert not encoder.capture and not encoder.graphs and "image encoder: CUDA graph capture failed" in caplog.text
    backend = FastBackend(net, buckets=True)
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    args = batch_inputs([[20, 21, 22, g, s]], 3, dtype=torch.bool)[:3]
    want, _ = backend.prefill(*args, capacity=40)
    backend._prefill = BucketedPrefill(backend.glm, backend._cache, capture=True)   # as on a GPU
    got, _ = backend.prefill(*args, capacity=40)
    assert torch.equal(got, want) and not backend._prefill.capture and "prefill: CUDA graph capture failed" in caplog.text


def test_captured_prefill_and_image_encoder_equal_their_eager_runs(net, tiny_config):
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    gpu = build_model(tiny_config, device="cuda").eval()
    gpu.load_state_dict(net.state_dict())
    graphs, eager = FastBackend(gpu), FastBackend(gpu, cuda_graph=False, compile=False, buckets=True)
    pixels = torch.randn(3, 3, 224, 224, device="cuda")
    assert torch.allclose(graphs.encode_image(pixels), eager.encode_image(pixels), atol=1e-4)
    assert list(graphs.vision.graphs) == [3]                                  # 3 images: the graph of 3
    emb = eager.encode_image(pixels[:1])[0]
    ref = list(generate(eager, mixed_batch(tiny_config, emb), 3, []))
    assert list(generate(graphs, mixed_batch(tiny_config, emb), 3, [])) == ref


def test_recording_keeps_no_autograd_state(monkeypatch):
    """record() runs its warm-ups and its capture without autograd: a captured run of parameters that require
    grad would otherwise keep every saved activation alive for as long as the graph (0.47 GiB per image in
    the image encoder's graphs on an H200). CUDA's parts are stood in for, so that this runs on the CPU."""
    from model.fast import graphs

    class Stream:
        def wait_stream(self, other):
            pass
    monkeypatch.setattr(graphs, "_side_stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    layer = torch.nn.Linear(8, 8)
    grad_modes = []

    def run():
        grad_modes.append(torch.is_grad_enabled())
        return torch.nn.functional.gelu(layer(torch.randn(2, 8)))
    _, out = graphs.record(run, warmups=2)
    assert layer.weight.requires_grad and torch.is_grad_enabled()          # as a loaded model is, outside
    assert grad_modes == [False, False, False] and not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("quant", [None, 4])
def test_kernels_launched_with_pdl_give_the_tokens_of_plain_launches(net, tiny_config, monkeypatch, quant):
    """On Hopper and later the fast path's kernels and the compiled step's own launch with programmatic
    dependent launch (each starts while the one before it ends): a read before its wait would show here
    as other tokens than with PDL off. Batch 1, so the one-row GEMVs (float or int4) and the attention
    kernel run."""
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    from model.fast import kernels
    if not kernels.pdl("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")

    def tokens():
        gpu = build_model(tiny_config, device="cuda").eval()       # afresh: quantizing releases its weights
        gpu.load_state_dict(net.state_dict())
        backend = FastBackend(gpu, quant=quant)
        emb = backend.encode_image(torch.randn(1, 3, 224, 224, device="cuda", generator=torch.Generator(
            device="cuda").manual_seed(0)))[0]
        return [list(generate(backend, [request], 1, [])) for request in mixed_batch(tiny_config, emb)]

    with_pdl = tokens()
    monkeypatch.setitem(kernels._pdl, torch.device("cuda", torch.cuda.current_device()), False)
    assert kernels.pdl_options("cuda") == {"PDL": False}
    assert tokens() == with_pdl
