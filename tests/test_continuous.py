"""Continuous batching (model/continuous.py over model/fast/slots.py) against generate() one request at a
time on the sat backend (the reference path), on a tiny random model, fp32 on the CPU."""
import dataclasses

import pytest
import torch

from model.continuous import ContinuousBatch
from model.fast import FastBackend
from model.fast.slots import FastSlots
from model.generation import Request, generate
from model.sampling import SamplingParams
from model.sat.backend import SatBackend
from model.sat.checkpoint import build_model
from conftest import randomize


@pytest.fixture(scope="module")
def net(tiny_config):
    return randomize(build_model(tiny_config, device="cpu"), seed=5).eval()


@pytest.fixture(scope="module")
def emb(net):
    return net.encode_image(torch.randn(2, 3, 224, 224))             # [2, L, hidden]


def make_requests(cfg, emb, n=7):
    """Mixed prompt lengths, with and without images, greedy with different penalties and limits."""
    L, g, s = cfg["image_length"], cfg["gmask_token_id"], cfg["bos_token_id"]
    out = []
    for i in range(n):
        text = [20 + (i * 7 + j) % 40 for j in range(2 + (i * 3) % 9)]
        params = SamplingParams(max_length=40 + 5 * i + (L if i % 2 else 0), top_k=1,
                                repetition_penalty=1.0 + 0.2 * (i % 3),
                                max_new_tokens=None if i % 3 else 6 + i)
        if i % 2:
            out.append(Request(ids=[20, 21] + [3] * L + text + [g, s], params=params, image_embeds=emb[i % 2],
                               pre_image=2))
        else:
            out.append(Request(ids=text + [g, s], params=params))
    return out


def alone(backend, request):
    """The answer of one request run by itself through generate()."""
    r = dataclasses.replace(request)
    return [step[0] for step in generate(backend, [r], 3, [4])]


def run(batch, arrivals):
    """Drive the batch: arrivals[t] are admitted before step t. Returns answers and the order of ends."""
    answers, ended, t = {}, [], 0
    arrivals, waiting = list(arrivals), []
    while arrivals or waiting or batch.running:
        while arrivals and t >= arrivals[0][0]:
            waiting += arrivals.pop(0)[1]
        if waiting and batch.free:
            take, waiting = waiting[:batch.free], waiting[batch.free:]
            events = batch.admit(take)
        else:
            events = batch.step()
        for e in events:
            if e.token is not None:
                answers.setdefault(id(e.request), []).append(e.token)
            if e.reason is not None:
                ended.append(e.request)
        t += 1
    return answers, ended


@pytest.mark.parametrize("ahead", [False, True])
def test_greedy_answers_equal_one_at_a_time_with_arrivals_while_decoding(net, tiny_config, emb, ahead):
    reqs = make_requests(tiny_config, emb)
    ref = [alone(SatBackend(net), r) for r in reqs]
    batch = ContinuousBatch(FastSlots(FastBackend(net), slots=4, length=128), pad_id=3, eos_ids=[4], ahead=ahead)
    # three at once, then newcomers while those decode (more than the 4 slots over the whole run)
    answers, ended = run(batch, [(0, reqs[:3]), (2, reqs[3:4]), (5, reqs[4:5]), (30, reqs[5:7])])
    assert [answers.get(id(r), []) for r in reqs] == ref
    assert sum(map(len, ref)) > 80                                   # the rows really generated
    assert not batch.running and batch.free == 4


def test_greedy_answers_equal_one_at_a_time_through_captured_graphs(net, tiny_config, emb, fake_graphs):
    """The same run with every prefill wave and decode step replaying a graph captured at warm-up (CUDA
    graphs stood in for on the CPU, see conftest.fake_graphs): waves of 3, 1, 1 and 2 prompts in buckets
    of 4, 1, 1 and 2 rows."""
    reqs = make_requests(tiny_config, emb)
    ref = [alone(SatBackend(net), r) for r in reqs]
    slots = FastSlots(FastBackend(net), slots=4, length=128, cuda_graph=True)
    slots.warm_up()
    captured = len(fake_graphs["pools"])
    batch = ContinuousBatch(slots, pad_id=3, eos_ids=[4], ahead=False)
    answers, _ = run(batch, [(0, reqs[:3]), (2, reqs[3:4]), (5, reqs[4:5]), (30, reqs[5:7])])
    assert [answers.get(id(r), []) for r in reqs] == ref
    assert len(fake_graphs["pools"]) == captured and len(fake_graphs["replays"]) > 80   # replays, no captures


@pytest.mark.parametrize("ahead", [False, True])
def test_running_ahead_steps_once_more_for_an_answer_that_ends_on_eos(net, tiny_config, ahead):
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    request = Request(ids=[20, 21, g, s], params=SamplingParams(max_length=60, top_k=1))
    plain = alone(SatBackend(net), request)
    end = next(i for i in range(3, len(plain)) if plain[i] not in plain[:i])
    slots = FastSlots(FastBackend(net), slots=2, length=64)
    calls, real = [], slots.decode
    slots.decode = lambda *a: calls.append(1) or real(*a)
    batch = ContinuousBatch(slots, pad_id=3, eos_ids=[plain[end]], ahead=ahead)
    answers, ended = run(batch, [(0, [request])])
    assert answers[id(request)] == plain[:end] and ended == [request] and request.error is None
    assert len(calls) == end + (1 if ahead else 0)      # admission samples the first token; the eos is dropped


@pytest.mark.parametrize("ahead", [False, True])
def test_a_short_request_sent_after_a_long_one_finishes_first(net, tiny_config, ahead):
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    long = Request(ids=[20, 21, g, s], params=SamplingParams(max_length=120, top_k=1, max_new_tokens=100))
    short = Request(ids=[22, 23, g, s], params=SamplingParams(max_length=120, top_k=1, max_new_tokens=3))
    batch = ContinuousBatch(FastSlots(FastBackend(net), slots=2, length=128), pad_id=3, eos_ids=[], ahead=ahead)
    _, ended = run(batch, [(0, [long]), (5, [short])])
    assert ended == [short, long]


@pytest.mark.parametrize("ahead", [False, True])
def test_slots_are_freed_on_finish_and_cancel_and_reused(net, tiny_config, ahead):
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    batch = ContinuousBatch(FastSlots(FastBackend(net), slots=3, length=64), pad_id=3, eos_ids=[], ahead=ahead)
    for round_ in range(8):
        reqs = [Request(ids=[20 + round_, 21, g, s], params=SamplingParams(max_length=64, top_k=1,
                                                                            max_new_tokens=2 + k))
                for k in range(3)]
        batch.admit(reqs)
        assert batch.free == 0
        assert batch.cancel(reqs[2]) and not batch.cancel(reqs[2])
        while batch.running:
            batch.step()
        assert batch.free == 3


def test_a_request_longer_than_a_slot_ends_with_an_error_and_the_others_run(net, tiny_config):
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    batch = ContinuousBatch(FastSlots(FastBackend(net), slots=2, length=32), pad_id=3, eos_ids=[])
    big = Request(ids=[20, g, s], params=SamplingParams(max_length=33, top_k=1))
    ok = Request(ids=[20, g, s], params=SamplingParams(max_length=32, top_k=1))
    events = batch.admit([big, ok])
    assert events[0] == (big, None, "error") and "32 tokens" in str(big.error)
    while batch.running:
        events = batch.step()
    assert events[-1].reason == "length" and ok.error is None


def test_one_rows_sampling_failure_ends_that_row_alone(net, tiny_config, emb, monkeypatch):
    from model import continuous
    reqs = make_requests(tiny_config, emb, n=3)
    ref = [alone(SatBackend(net), r) for r in reqs]
    real, calls = continuous.rank_logits, []

    def flaky(logits, seen, rows):        # NaN logits for the second request at its third token
        ranked = real(logits, seen, rows)
        calls.append(1)
        if len(calls) == 3:
            ranked.nan = ranked.nan.clone()
            ranked.nan[1] = True
        return ranked
    monkeypatch.setattr(continuous, "rank_logits", flaky)
    batch = ContinuousBatch(FastSlots(FastBackend(net), slots=4, length=128), pad_id=3, eos_ids=[4])
    answers, _ = run(batch, [(0, reqs)])
    assert isinstance(reqs[1].error, ValueError)
    assert answers[id(reqs[0])] == ref[0] and answers[id(reqs[2])] == ref[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs of the slot decode step need a GPU")
def test_graph_captured_decoding_equals_eager_on_the_gpu(net, tiny_config):
    gpu = build_model(tiny_config, device="cuda")
    gpu.load_state_dict(net.state_dict())
    gpu.eval()
    emb = gpu.encode_image(torch.randn(2, 3, 224, 224, device="cuda"))
    answers = []
    for graph in (False, True):
        batch = ContinuousBatch(FastSlots(FastBackend(gpu, cuda_graph=False), slots=4, length=256, cuda_graph=graph),
                                pad_id=3, eos_ids=[4])
        reqs = make_requests(tiny_config, emb)
        got, _ = run(batch, [(0, reqs[:3]), (2, reqs[3:4]), (5, reqs[4:5]), (30, reqs[5:7])])
        answers.append([got.get(id(r), []) for r in reqs])
        assert graph == bool(batch.slots._graphs)
    assert answers[0] == answers[1] and sum(map(len, answers[0])) > 80


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: only there can a step wait for the device")
def test_decoding_steps_never_wait_for_the_gpu(net, tiny_config):
    """As generate()'s test: after admission (which reads the first tokens at once), a step of the running
    batch must not make the host wait for the GPU, also when a sequence leaves (new row settings) and with
    graphs captured. Under CUDA's sync debug mode any such wait raises."""
    gpu = build_model(tiny_config, device="cuda")
    gpu.load_state_dict(net.state_dict())
    emb = gpu.eval().encode_image(torch.randn(2, 3, 224, 224, device="cuda"))
    batch = ContinuousBatch(FastSlots(FastBackend(gpu, compile=False), slots=8, length=256), pad_id=3, eos_ids=[])
    reqs = make_requests(tiny_config, emb, n=5)
    for r in reqs[1::2]:
        r.params = dataclasses.replace(r.params, top_k=7, temperature=0.8)
    reqs[2].generator = torch.Generator().manual_seed(1)
    events = batch.admit(reqs)
    torch.cuda.set_sync_debug_mode("error")
    try:
        while batch.running:
            events += batch.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ends = [e.reason for e in events if e.reason is not None]
    assert len(ends) == len(reqs) and set(ends) == {"length"}
