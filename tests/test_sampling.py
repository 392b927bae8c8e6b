"""Batched sampling (model/sampling.py) against a plain per-row reference of sat's BaseStrategy rules."""
import random

import torch

from model.sampling import RowSettings, SamplingParams, draw, filter_logits


def reference_filter(logits, generated, p):
    """One row, written independently and plainly: temperature / penalty division, invalid slices,
    top-k then top-p (both off when top_k == 0); removed tokens -inf."""
    x = logits.double().clone()
    t = max(p.temperature, 1e-5)
    for i in range(len(x)):
        x[i] = x[i] / (t * p.repetition_penalty if i in set(generated) else t)
    for s in p.invalid_slices:
        x[s] = float("-inf")
    if p.top_k > 0:
        kth = sorted(x.tolist(), reverse=True)[min(p.top_k, len(x)) - 1]
        x[x < kth] = float("-inf")
        if p.top_p < 1.0:
            order = sorted(range(len(x)), key=lambda i: -x[i].item())
            probs = torch.softmax(x, 0)
            total = 0.0
            for rank, i in enumerate(order):
                if rank > 0 and total > p.top_p:
                    x[i] = float("-inf")
                total += probs[i].item()
    return x.float()


def test_batched_filter_equals_the_per_row_reference():
    rng = random.Random(0)
    vocab = 40
    for trial in range(20):
        batch = rng.randint(1, 5)
        params = [SamplingParams(temperature=rng.choice([0.0, 0.3, 0.95, 2.0]), top_k=rng.choice([0, 1, 5, 30, 100]),
                                 top_p=rng.choice([0.0, 0.4, 0.7, 1.0]), repetition_penalty=rng.choice([1.0, 1.2, 3.0]),
                                 invalid_slices=[slice(30, 35)] if rng.random() < 0.3 else [])
                  for _ in range(batch)]
        logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(trial)) * 3
        generated = [rng.sample(range(vocab), rng.randint(0, 6)) for _ in range(batch)]
        seen = torch.zeros(batch, vocab, dtype=torch.bool)
        for b, g in enumerate(generated):
            seen[b, g] = True
        filtered, nan, empty = filter_logits(logits, seen, RowSettings.of(params, vocab, "cpu"))
        assert not nan.any() and not empty.any()
        for b in range(batch):
            expected = reference_filter(logits[b], generated[b], params[b])
            assert torch.equal(torch.isinf(filtered[b]), torch.isinf(expected)), (trial, b, params[b])
            kept = ~torch.isinf(expected)
            assert torch.allclose(filtered[b][kept], expected[kept], rtol=1e-5), (trial, b)


def test_draw_follows_the_distribution_and_never_picks_a_removed_token():
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).expand(20000, -1)
    rows = RowSettings.of([SamplingParams(top_k=0, temperature=1.0)] * 20000, 4, "cpu")
    torch.manual_seed(0)
    tokens = draw(logits, rows, [None] * 20000)
    counts = torch.bincount(tokens, minlength=4).float() / 20000
    assert counts[3] == 0
    assert torch.allclose(counts[:3], torch.softmax(logits[0, :3], 0), atol=0.015)


def test_a_seeded_row_draws_the_same_tokens_on_its_own_or_in_a_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    rows = RowSettings.of([SamplingParams(top_k=0, temperature=1.0)] * 3, 50, "cpu")
    alone = [draw(logits[1:2], RowSettings.of([SamplingParams(top_k=0, temperature=1.0)], 50, "cpu"),
                  [torch.Generator().manual_seed(7)]).item() for _ in range(2)]
    batched = draw(logits, rows, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(7),
                                  torch.Generator().manual_seed(5)])
    assert alone[0] == alone[1] == batched[1].item()


def test_nan_and_empty_rows_are_flagged_not_raised():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    params = [SamplingParams(), SamplingParams(), SamplingParams(invalid_slices=[slice(0, 10)])]
    _, nan, empty = filter_logits(logits, torch.zeros(3, 10, dtype=torch.bool), RowSettings.of(params, 10, "cpu"))
    assert nan.tolist() == [False, True, False] and empty[0].item() is False and empty[2].item() is True
