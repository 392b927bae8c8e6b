"""generate()'s sampling step replayed as a graph (model/fast/sampler.py), on the CPU with graphs stood in
for (conftest.fake_graphs): the same tokens as the eager step across calls whose settings differ, rows
with their own generators left to the eager step, a failed capture falling back to it."""
import pytest
import torch

from model.fast import FastBackend
from model.generation import Request, generate
from model.sampling import SamplingParams
from model.sat.checkpoint import build_model
from conftest import randomize
from test_fast_graphs import mixed_batch


@pytest.fixture(scope="module")
def net(tiny_config):
    return randomize(build_model(tiny_config, device="cpu"), seed=7).eval()


def answers(backend, requests, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    rows = [[] for _ in requests]
    for step in generate(backend, requests, 3, [], ahead=True):
        for b, token in enumerate(step):
            if token is not None:
                rows[b].append(token)
    return rows


def sampled(cfg, emb, **settings):
    """mixed_batch's prompts, drawing with the given settings instead of greedily."""
    reqs = mixed_batch(cfg, emb)
    for r in reqs:
        r.params = SamplingParams(max_length=r.params.max_length, max_new_tokens=20, **settings)
    return reqs


def test_the_captured_step_gives_the_eager_steps_tokens_call_after_call(net, tiny_config, fake_graphs):
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0]
    eager, captured = FastBackend(net, cuda_graph=False), FastBackend(net, cuda_graph=False)
    captured.sample_graph = True
    calls = [lambda: mixed_batch(tiny_config, emb),                                    # greedy, penalty 1.3
             lambda: mixed_batch(tiny_config, emb, prompt_tokens=(7, 30, 12)),        # same graph, new rows
             lambda: sampled(tiny_config, emb, top_k=5, top_p=0.7, temperature=0.9, repetition_penalty=1.3),
             lambda: sampled(tiny_config, emb, top_k=40, top_p=0.9, temperature=1.1, repetition_penalty=1.3),
             lambda: sampled(tiny_config, emb, top_k=5, top_p=0.5, temperature=1.6, repetition_penalty=1.3)]
    for make in calls:           # record each setting's graph first: recording runs the step (and draws)
        answers(captured, make())
    replays = len(fake_graphs["replays"])
    for make in calls:
        assert answers(captured, make(), seed=1) == answers(eager, make(), seed=1), calls.index(make)
    assert len(fake_graphs["replays"]) - replays > 5 * 20                  # the graphs did the sampling
    assert len(captured._samplers._samplers) == 3            # one per ranks: greedy (1), top-k 5, top-k 40


def test_rows_with_their_own_generator_keep_the_eager_step(net, tiny_config, fake_graphs):
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0]
    backend = FastBackend(net, cuda_graph=False)
    backend.sample_graph = True
    seeded = sampled(tiny_config, emb, top_k=5, top_p=0.7, temperature=0.9)
    seeded[0].generator = torch.Generator().manual_seed(3)
    answers(backend, seeded)
    assert not fake_graphs["replays"] and not backend._samplers._samplers


def test_a_failed_capture_samples_eagerly(net, tiny_config, caplog):
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0]
    eager, captured = FastBackend(net, cuda_graph=False), FastBackend(net, cuda_graph=False)
    captured.sample_graph = True                     # no stand-in: capturing CPU work fails
    assert answers(captured, mixed_batch(tiny_config, emb)) == answers(eager, mixed_batch(tiny_config, emb))
    assert "sampling step: CUDA graph capture failed" in caplog.text


def test_the_backend_keeps_the_latest_few_samplers(net, tiny_config, fake_graphs):
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0]
    backend = FastBackend(net, cuda_graph=False)
    backend.sample_graph = True
    for k in range(2, 8):                            # six settings of different ranks: six graphs
        answers(backend, sampled(tiny_config, emb, top_k=k, top_p=0.9, temperature=1.0))
    kept = backend._samplers._samplers
    assert len(kept) == backend._samplers.size and [key[2] for key in kept] == [4, 5, 6, 7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs an NVIDIA GPU")
def test_the_captured_step_on_the_gpu_gives_the_greedy_tokens_of_the_eager_one(net, tiny_config):
    gpu = build_model(tiny_config, device="cuda").eval()
    gpu.load_state_dict(net.state_dict())
    emb = gpu.encode_image(torch.randn(1, 3, 224, 224, device="cuda"))[0]
    eager, captured = FastBackend(gpu, compile=False), FastBackend(gpu, compile=False)
    eager.sample_graph = False
    for prompts in ((5, 40, 10), (7, 30, 12)):
        assert answers(captured, mixed_batch(tiny_config, emb, prompts)) == \
            answers(eager, mixed_batch(tiny_config, emb, prompts))
    assert captured._samplers._samplers and all(s.ok for s in captured._samplers._samplers.values())
