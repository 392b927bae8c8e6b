"""Batched sampling (model/sampling.py) against a plain per-row reference of sat's BaseStrategy rules."""
import random

import pytest
import torch

from model.sampling import Ranked, RowSettings, SamplingParams, StepSampler, draw, filter_logits, rank_logits


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
    tokens = draw(rank_logits(logits, torch.zeros(20000, 4, dtype=torch.bool), rows), rows, [None] * 20000)
    counts = torch.bincount(tokens, minlength=4).float() / 20000
    assert counts[3] == 0
    assert torch.allclose(counts[:3], torch.softmax(logits[0, :3], 0), atol=0.015)


def test_a_seeded_row_draws_the_same_tokens_on_its_own_or_in_a_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    rows = RowSettings.of([SamplingParams(top_k=0, temperature=1.0)] * 3, 50, "cpu")
    one = RowSettings.of([SamplingParams(top_k=0, temperature=1.0)], 50, "cpu")
    alone = [draw(rank_logits(logits[1:2], torch.zeros(1, 50, dtype=torch.bool), one), one,
                  [torch.Generator().manual_seed(7)]).item() for _ in range(2)]
    batched = draw(rank_logits(logits, torch.zeros(3, 50, dtype=torch.bool), rows), rows,
                   [torch.Generator().manual_seed(seed) for seed in (3, 7, 5)])
    assert alone[0] == alone[1] == batched[1].item()


def test_nan_and_empty_rows_are_flagged_not_raised():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    params = [SamplingParams(), SamplingParams(), SamplingParams(invalid_slices=[slice(0, 10)])]
    _, nan, empty = filter_logits(logits, torch.zeros(3, 10, dtype=torch.bool), RowSettings.of(params, 10, "cpu"))
    assert nan.tolist() == [False, True, False] and empty[0].item() is False and empty[2].item() is True


def test_greedy_takes_the_lowest_id_among_equal_best_logits_as_argmax_does():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0], [5.0, 1.0, 5.0, 0.0, 2.0]])
    for top_k in (1, 3, 0):                                   # topk and sort paths
        rows = RowSettings.of([SamplingParams(top_k=top_k, temperature=0.0)] * 2, 5, "cpu")
        tokens = draw(rank_logits(logits, torch.zeros(2, 5, dtype=torch.bool), rows), rows, [None, None])
        assert tokens.tolist() == logits.argmax(-1).tolist() == [1, 0]
    # whatever order a GPU's topk gives equal values in
    ranked = Ranked(torch.tensor([[3.0, 3.0, 3.0, 1.0]]), torch.tensor([[4, 1, 3, 0]]), torch.tensor([False]),
                    torch.tensor([False]))
    assert draw(ranked, RowSettings.of([SamplingParams(top_k=1)], 5, "cpu"), [None]).tolist() == [1]


def test_a_draw_is_the_inverse_cdf_over_the_whole_vocabulary_in_id_order():
    """Only the ranked candidates are looked at, yet a uniform number u picks the token that the inverse
    CDF of the full filtered row (ids in order, removed ones with probability 0) gives for it."""
    torch.manual_seed(0)
    vocab, batch = 300, 64
    logits = torch.randn(batch, vocab) * 2
    params = [SamplingParams(top_k=[5, 40, 0][b % 3], top_p=[0.5, 0.9, 1.0][b % 3], temperature=0.8,
                             repetition_penalty=1.0) for b in range(batch)]
    rows = RowSettings.of(params, vocab, "cpu")
    seen = torch.zeros(batch, vocab, dtype=torch.bool)
    seeds = [torch.Generator().manual_seed(100 + b) for b in range(batch)]
    tokens = draw(rank_logits(logits, seen, rows), rows, seeds)
    filtered, _, _ = filter_logits(logits, seen, rows)
    for b in range(batch):
        u = torch.rand((), generator=torch.Generator().manual_seed(100 + b)).item()
        cdf = torch.softmax(filtered[b].double(), 0).cumsum(0)
        expected = int(torch.searchsorted(cdf, torch.tensor([(1 - u) * cdf[-1].item()], dtype=torch.double)))
        assert tokens[b].item() == expected, b
        assert torch.isfinite(filtered[b, tokens[b]])


def test_infinite_logits_leave_only_those_tokens_in_play():
    logits = torch.zeros(400, 10)
    logits[:, 3] = logits[:, 7] = float("inf")
    rows = RowSettings.of([SamplingParams(top_k=5, top_p=1.0, temperature=0.5)] * 400, 10, "cpu")
    ranked = rank_logits(logits, torch.zeros(400, 10, dtype=torch.bool), rows)
    torch.manual_seed(1)
    tokens = draw(ranked, rows, [None] * 400)
    assert set(tokens.tolist()) == {3, 7} and not ranked.empty.any()


def test_a_nan_row_is_flagged_and_still_names_a_token_of_the_vocabulary():
    """A step records every row's token (the repetition penalty's marks) before generate() reads the
    flags: a greedy NaN row once named id 2^63 - 1, out of range there (a device assert on a GPU)."""
    logits = torch.randn(3, 10)
    logits[0, 4] = logits[2, 1] = float("nan")
    params = [SamplingParams(top_k=1), SamplingParams(top_k=1), SamplingParams(top_k=5, temperature=0.7)]
    rows = RowSettings.of(params, 10, "cpu")
    tokens, flags = StepSampler(rows, 3, 10, "cpu", [None] * 3)(logits)
    assert flags[1].tolist() == [1, 0, 1] and tokens.tolist()[1] == logits[1].argmax().item()
    assert ((tokens >= 0) & (tokens < 10)).all()


def test_an_infinite_logit_in_an_invalid_slice_is_masked_not_certain():
    """+inf is read after invalid slices are masked (sat masks them too, before it samples): the masked
    token is out and the others stay in play."""
    logits = torch.zeros(200, 10)
    logits[:, 2] = float("inf")
    rows = RowSettings.of([SamplingParams(top_k=5, top_p=1.0, temperature=1.0, invalid_slices=[slice(0, 3)])] * 200,
                          10, "cpu")
    ranked = rank_logits(logits, torch.zeros(200, 10, dtype=torch.bool), rows)
    tokens = draw(ranked, rows, [None] * 200)
    assert not ranked.empty.any() and set(tokens.tolist()) <= set(range(3, 10)) and len(set(tokens.tolist())) > 1
