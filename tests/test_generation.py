"""Sampling rules (spec 7.1) and the cached decoding loop."""
import pytest
import torch

from model.sat.checkpoint import build_model
from model.generation import Request, generate
from model.sampling import SamplingParams, process_logits, sample
from model.positions import batch_inputs
from conftest import fail_rows, randomize


@pytest.fixture(scope="module")
def net(tiny_config):
    return randomize(build_model(tiny_config, device="cpu"), seed=1).eval()


def full_recompute_logits(m, seq, context_length, image_embeds=None, pre_image=-1):
    ids, pos, mask, _ = batch_inputs([seq], pad_id=3, context_lengths=[context_length])
    kw = {} if image_embeds is None else dict(image_embeds=image_embeds[None], pre_image=torch.tensor([pre_image]))
    with torch.no_grad():
        return m(input_ids=ids, position_ids=pos, attention_mask=mask, **kw)[0][0, -1].float()   # sat directly


@pytest.mark.parametrize("with_image", [False, True])
def test_cached_decoding_equals_full_recomputation(net, tiny_config, with_image):
    L = tiny_config["image_length"]
    gmask, sop = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    if with_image:
        prompt, pre = [20, 21] + [3] * L + [22, 23, gmask, sop], 2
        emb = net.encode_image(torch.randn(1, 3, 224, 224))[0].detach()
    else:
        prompt, pre, emb = [20, 21, 22, 23, 24, gmask, sop], -1, None
    params = SamplingParams(top_k=1, max_length=len(prompt) + 24, repetition_penalty=1.5)
    tokens = [s[0] for s in generate(net, [Request(ids=prompt, params=params, image_embeds=emb, pre_image=pre)],
                                     pad_id=3, eos_ids=[])]
    assert len(tokens) == 24
    assert len(set(tokens)) > 3, "degenerate test: the random model should produce varied tokens"
    # greedy with the same penalty, one full forward per step, no cache
    seq, ref = list(prompt), []
    for _ in range(24):
        logits = full_recompute_logits(net, seq, len(prompt) - 1, emb, pre)
        t = int(process_logits(logits, ref, params).argmax())
        ref.append(t)
        seq.append(t)
    assert tokens == ref


def test_batched_generation_equals_one_by_one(net, tiny_config):
    L = tiny_config["image_length"]
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    emb = net.encode_image(torch.randn(1, 3, 224, 224))[0].detach()
    reqs = [Request(ids=[20, 21, 22, g, s], params=SamplingParams(top_k=1, max_length=20)),
            Request(ids=[20, 21] + [3] * L + [25, 26, 27, 28, g, s], params=SamplingParams(top_k=1, max_length=60),
                    image_embeds=emb, pre_image=2),
            Request(ids=[30, 31, 32, 33, 34, 35, 36, 37, g, s], params=SamplingParams(top_k=1, max_length=30))]
    alone = [[st[0] for st in generate(net, [r], 3, [])] for r in reqs]
    together = list(generate(net, reqs, 3, []))
    for b in range(3):
        assert [st[b] for st in together if st[b] is not None] == alone[b]
    assert [len(a) for a in alone] == [15, 60 - (2 + L + 6), 20]  # max_length counts the prompt


def test_eos_stops_and_is_not_returned(net, tiny_config):
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    r = Request(ids=[20, 21, g, s], params=SamplingParams(top_k=1, max_length=30, repetition_penalty=1.0))
    first = next(iter(generate(net, [r], 3, [])))[0]
    assert list(generate(net, [r], 3, [first])) == []


def test_top_k_zero_disables_top_p_and_top_p_zero_is_greedy():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    kept = process_logits(logits, [], SamplingParams(top_k=0, top_p=0.1, temperature=1.0))
    assert torch.equal(kept, logits)
    assert SamplingParams(top_k=5, top_p=0.0).greedy
    nucleus = process_logits(logits, [], SamplingParams(top_k=4, top_p=0.7, temperature=1.0))
    # softmax([3,2,1,0]) = .644, .237, .087, .032: the first token crosses 0.7 with the second
    assert (nucleus > -1000).tolist() == [True, True, False, False]


def test_repetition_penalty_only_on_generated_ids_and_divides():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = process_logits(logits, [0, 1], SamplingParams(top_k=0, temperature=0.5, repetition_penalty=2.0))
    assert torch.allclose(out, torch.tensor([2.0, -2.0, 2.0]))  # /(0.5*2) for ids 0,1 and /0.5 for id 2


def test_invalid_slices_and_temperature_zero():
    logits = torch.tensor([5.0, 1.0, 0.0, -1.0])
    p = SamplingParams(top_k=0, temperature=0, invalid_slices=[slice(0, 1)])
    assert sample(logits, [], p) == 1


def test_sampling_with_seed_is_reproducible_and_spreads():
    logits = torch.zeros(50)
    p = SamplingParams(top_k=50, top_p=1.0, temperature=1.0, repetition_penalty=1.0)
    a = [sample(logits, [], p, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(a)) == 1
    g = torch.Generator().manual_seed(0)
    assert len({sample(logits, [], p, g) for _ in range(40)}) > 10


def test_nan_logits_and_bad_params_raise():
    with pytest.raises(ValueError, match="NaN"):
        process_logits(torch.tensor([float("nan"), 1.0]), [], SamplingParams())
    for bad in [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0),
                dict(max_length=0)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_non_finite_settings_are_rejected():
    for bad in [dict(temperature=float("inf")), dict(temperature=float("nan")),
                dict(repetition_penalty=float("inf")), dict(repetition_penalty=float("nan"))]:
        with pytest.raises(ValueError, match="finite"):
            SamplingParams(**bad)


def test_extreme_settings_and_infinite_logits_never_give_nan():
    """Every accepted temperature / penalty, even with +-inf logits, leaves a finite distribution to sample
    from (a divisor of 1e-300 used to underflow to 0 in fp32: logits / 0 gave inf and NaN)."""
    inf = float("inf")
    base = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    with_inf = base.clone()
    with_inf[[3, 9]], with_inf[[4, 5]] = inf, -inf
    half_impossible = base.clone()
    half_impossible[::2] = -inf
    fp16_extremes = (base.sign() * 65504).half()
    generated = [0, 1, 2, 3, 10, 11]
    for logits in (base, with_inf, half_impossible, fp16_extremes):
        for temperature in (1e-30, 1.0, 1e30):
            for penalty in (1e-300, 1.0, 1e300):
                for top_k, top_p in ((0, 1.0), (30, 0.7), (64, 1.0), (1, 1.0)):
                    p = SamplingParams(temperature=temperature, repetition_penalty=penalty, top_k=top_k, top_p=top_p)
                    where = f"T={temperature} penalty={penalty} top_k={top_k} top_p={top_p}"
                    out = process_logits(logits, generated, p)
                    assert not torch.isnan(out).any() and torch.isfinite(out.max()), where
                    probs = torch.softmax(out, dim=-1)
                    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-4, where
                    token = sample(logits, generated, p, torch.Generator().manual_seed(1))
                    assert 0 <= token < 64 and torch.isfinite(out[token]), where
                    if logits is with_inf:
                        assert token in (3, 9), where          # +inf: only those can be drawn
                    else:
                        assert logits[token] > -inf, where


def test_a_tiny_penalty_keeps_the_order_of_the_logits():
    # 1e-300 (allowed: > 0) boosts generated ids by a huge factor; the best of them still wins
    logits = torch.tensor([1.0, 3.0, 2.0, 50.0, -1.0])
    out = process_logits(logits, [0, 1, 2, 4], SamplingParams(top_k=0, temperature=1.0, repetition_penalty=1e-300))
    assert out.argmax() == 1 and out[0] < out[2] < out[1] and out[4] < 0
    assert sample(logits, [0, 1, 2, 4], SamplingParams(top_k=1, temperature=1.0, repetition_penalty=1e-300)) == 1


def test_nothing_left_to_sample_is_an_error():
    with pytest.raises(ValueError, match="No token can be sampled"):
        sample(torch.tensor([1.0, 2.0]), [], SamplingParams(top_k=0, temperature=1.0, invalid_slices=[slice(0, 2)]))
    with pytest.raises(ValueError, match="No token can be sampled"):
        sample(torch.full((4,), float("-inf")), [], SamplingParams(top_k=1))


def test_a_failing_row_ends_alone_and_the_others_go_on(net, tiny_config, monkeypatch):
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    reqs = [Request(ids=[20, 21, 22, g, s], params=SamplingParams(top_k=1, max_length=20)),
            Request(ids=[23, 24, g, s], params=SamplingParams(top_k=1, max_length=20)),
            Request(ids=[30, 31, 32, 33, g, s], params=SamplingParams(top_k=1, max_length=20))]
    alone = [[st[0] for st in generate(net, [r], 3, [])] for r in reqs]
    fail_rows(monkeypatch, lambda rows: torch.arange(len(rows.plain)) == 1, at_step=2)   # row 1, third token
    with pytest.raises(ValueError, match="NaN"):                  # by default the exception propagates
        list(generate(net, reqs, 3, []))
    together = list(generate(net, reqs, 3, [], isolate_errors=True))
    rows = [[st[b] for st in together if st[b] is not None] for b in range(3)]
    assert rows[0] == alone[0] and rows[2] == alone[2]
    assert rows[1] == alone[1][:2], "the failing row must stop at once"
    assert isinstance(reqs[1].error, ValueError) and reqs[0].error is None and reqs[2].error is None


@pytest.mark.parametrize("flavour", ["sat", "fast"])
def test_running_one_step_ahead_gives_the_same_answers(net, tiny_config, flavour):
    """generate(ahead=True) (the GPU default) queues each step before reading the previous tokens: the
    same answers, with eos, max_new_tokens, max_length and seeded sampling rows in one batch; only a
    batch that ends on an eos has a step more computed (and dropped)."""
    from model.fast import FastBackend
    from model.sat.backend import SatBackend
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]

    def run(ahead, eos, rows=3):
        reqs = [Request(ids=[20, 21, 22, g, s], params=SamplingParams(top_k=1, max_length=40)),
                Request(ids=[30, 31, 32, 33, 34, 35, g, s], params=SamplingParams(top_k=50, top_p=0.9, max_length=20),
                        generator=torch.Generator().manual_seed(7)),
                Request(ids=[40, 41, g, s], params=SamplingParams(top_k=1, max_length=40, max_new_tokens=6))][:rows]
        backend = (SatBackend if flavour == "sat" else FastBackend)(net)
        calls, real = [], backend.decode_step
        backend.decode_step = lambda *a: calls.append(1) or real(*a)
        return list(generate(backend, reqs, 3, eos, ahead=ahead)), len(calls)

    plain, _ = run(False, [])
    row0, row1 = [st[0] for st in plain], [st[1] for st in plain]
    end = next(i for i in range(5, len(row0)) if row0[i] not in row0[:i] + row1)   # row 0 alone ends there
    eos = [row0[end]]
    (behind, steps), (ahead, steps_ahead) = run(False, eos), run(True, eos)
    assert ahead == behind and steps_ahead == steps            # the last row ends by length: nothing extra
    assert behind != plain and len({t for st in behind for t in st if t is not None}) > 5
    (behind, steps), (ahead, steps_ahead) = run(False, eos, rows=1), run(True, eos, rows=1)
    assert [st[0] for st in ahead] == row0[:end] and ahead == behind
    assert steps_ahead == steps + 1                            # ends on an eos: one step dropped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: only there can a step wait for the device")
def test_decoding_steps_never_wait_for_the_gpu(net, tiny_config):
    """Running ahead helps only if nothing in a step makes the host wait for the GPU (one `t[i] = True`
    did, on every token). Under CUDA's sync debug mode any such wait raises; waiting for a step's tokens
    (an event) is allowed. Rows sample, use a seed, a penalty, and end at different lengths."""
    from model.fast import FastBackend
    gpu = build_model(tiny_config, device="cuda")
    gpu.load_state_dict(net.state_dict())
    backend = FastBackend(gpu.eval(), compile=False)
    g, s = tiny_config["gmask_token_id"], tiny_config["bos_token_id"]
    reqs = [Request(ids=[20, 21, 22, g, s], params=SamplingParams(top_k=5, temperature=0.9, max_length=30)),
            Request(ids=[23, g, s], params=SamplingParams(top_k=1, repetition_penalty=1.3, max_length=18),
                    generator=torch.Generator().manual_seed(0))]
    steps = generate(backend, reqs, 3, [])
    next(steps)                                   # the prompt: its first tokens are read at once
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(rest) == (30 - 5) - 1 and sum(t is not None for _, t in rest) == (18 - 3) - 1   # all but the first
