"""The sampling kernel (model/fast/sampling_kernel.py) against model/sampling.py's torch steps
(filter_ranked, pick) on the same candidates and uniform numbers: tokens, NaN and empty flags, the record
of generated tokens. On a GPU directly, on the CPU in Triton's interpreter (skipped where Triton is not
installed, as in CI)."""
import pytest
import torch

from conftest import in_triton_interpreter
from model.sampling import RowSettings, SamplingParams, candidates, filter_ranked, pick


def cases(device: str):
    """(logits [B, V], seen, rows): top-k 1 / 5 / 100 / 300 / 1024 (no power of two among some), top-p on
    and off, greedy rows, temperatures, a penalty, invalid slices, logits rounded to fp16 (ties, so the
    lowest id must win), rows with two +inf logits, a NaN, nothing left to sample."""
    g = torch.Generator().manual_seed(0)
    vocab = 3000
    for B, top_ks, penalty, invalid in ((48, (1, 5, 100), 1.0, False), (16, (300, 7), 1.3, False),
                                        (10, (1024, 40), 1.0, True), (48, (100,), 1.0, False)):  # (interpreter time)
        params = [SamplingParams(top_k=top_ks[b % len(top_ks)], top_p=[1.0, 0.4, 0.9, 0.05][b % 4],
                                 temperature=[0.8, 1.0, 0.0, 1.7, 0.3][b % 5], repetition_penalty=penalty,
                                 invalid_slices=[slice(10, 200)] if invalid else []) for b in range(B)]
        logits = (torch.randn(B, vocab, generator=g) * 3).half().float()
        logits[1, [17, 2000]] = float("inf")
        logits[2, 5] = float("nan")
        logits[3] = float("-inf")
        if invalid:
            logits[4, 50] = float("inf")                    # masked: not a certain token
        seen = torch.rand(B, vocab, generator=g) < 0.05
        rows = RowSettings.of(params, vocab, device)
        yield logits.to(device), seen.to(device), rows


def check_sampling_kernel(device: str) -> None:
    from model.fast import sampling_kernel
    torch.manual_seed(1)
    for case, (logits, seen, rows) in enumerate(cases(device)):
        values, tokens = candidates(logits, seen, rows)
        u = torch.rand(logits.shape[0], device=device)
        ranked = filter_ranked(values, tokens, rows)
        expected = pick(ranked, rows, u)
        marked = seen.clone()
        got = sampling_kernel.sample(values, tokens, rows, u, marked)                # [3, B]
        assert torch.equal(got[1].bool(), ranked.nan), case
        assert torch.equal(got[2].bool(), ranked.empty), case
        ok = ~(ranked.nan | ranked.empty)
        assert torch.equal(got[0][ok], expected[ok]), (case, torch.nonzero(got[0] != expected).flatten().tolist())
        assert ((got[0] >= 0) & (got[0] < logits.shape[1])).all(), case             # flagged rows too
        assert ranked.nan[2] and ranked.empty[3] and not ranked.empty[1], case
        assert set(got[0][1:2].tolist()) <= {17, 2000}, case
        seen[torch.arange(logits.shape[0], device=device), got[0]] = True
        assert torch.equal(marked, seen), case


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on an NVIDIA GPU (or the interpreter)")
def test_the_kernel_samples_as_the_torch_steps_on_the_gpu():
    check_sampling_kernel("cuda")


def test_the_kernel_samples_as_the_torch_steps_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (CUDA builds of torch bring it)")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the test above runs the kernel itself")
    in_triton_interpreter("from test_fast_sampling_kernel import check_sampling_kernel; check_sampling_kernel('cpu')")


def check_generate_with_the_kernel(device: str) -> None:
    """generate() on a tiny model with the kernel's step (forced in on the CPU) against the torch step:
    the same answers for a batch of three rows, greedy with a repetition penalty (the kernel's record of
    tokens), sampled with top-k / top-p, and seeded (uniforms from each row's generator)."""
    from model.configs import tiny_config
    from model.fast import FastBackend
    from model.fast.sampler import KernelStepSampler
    from model.generation import Request, generate
    from model.sat.checkpoint import build_model
    from conftest import randomize
    cfg = tiny_config(num_layers=2, hidden_size=64, num_attention_heads=2)
    net = randomize(build_model(cfg, device="cpu"), seed=5).eval().to(device)
    g, s = cfg["gmask_token_id"], cfg["bos_token_id"]
    settings = [dict(top_k=1, repetition_penalty=1.3), dict(top_k=40, top_p=0.8, temperature=0.9),
                dict(top_k=7, top_p=0.6, temperature=1.2, repetition_penalty=1.2)]

    def answers(backend, seeded):
        torch.manual_seed(3)
        requests = [Request(ids=[20 + b, 21, 22 + 5 * b, g, s], params=SamplingParams(max_length=40, **kw),
                            generator=torch.Generator().manual_seed(b) if seeded else None)
                    for b, kw in enumerate(settings)]
        rows = [[] for _ in requests]
        for step in generate(backend, requests, 3, []):
            for b, token in enumerate(step):
                if token is not None:
                    rows[b].append(token)
        return rows

    plain, fused = FastBackend(net, cuda_graph=False), FastBackend(net, cuda_graph=False)
    made = []

    def kernel_step(rows, batch, vocab, generators, ring=None):
        made.append(KernelStepSampler(rows, batch, vocab, device, generators, ring))
        return made[-1]
    plain.step_sampler = lambda *args, **kwargs: None
    fused.step_sampler = kernel_step
    for seeded in (False, True):
        expected = answers(plain, seeded)
        assert answers(fused, seeded) == expected and all(len(row) > 10 for row in expected), seeded
    assert len(made) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on an NVIDIA GPU (or the interpreter)")
def test_generate_with_the_kernel_gives_the_torch_steps_answers_on_the_gpu():
    check_generate_with_the_kernel("cuda")


def test_generate_with_the_kernel_gives_the_torch_steps_answers_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (CUDA builds of torch bring it)")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the test above runs the kernel itself")
    in_triton_interpreter("from test_fast_sampling_kernel import check_generate_with_the_kernel; "
                          "check_generate_with_the_kernel('cpu')")
