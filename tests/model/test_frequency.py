"""The streaming frequency estimator on a hand-traced stream and against exact counts on a Zipf stream."""

from __future__ import annotations

import io
import math

import pytest
import torch

from towerflow.models.frequency import FrequencyError, StreamingFrequencyEstimator, exact_log_q


def test_hand_traced_stream():
    est = StreamingFrequencyEstimator(n_buckets=1024, alpha=0.5, seed=0)
    ids = torch.tensor([1, 2, 3])
    assert len(set(est.bucket(ids).tolist())) == 3  # no collisions, so each id is traced on its own

    est.update(torch.tensor([1, 2]), step=0)
    # first sighting: last seen "just before the stream" (step -1), gap 0 - (-1) = 1, so B1 = B2 = 1
    est.update(torch.tensor([1]), step=1)
    # id 1: gap 1, B1 = 0.5 * 1 + 0.5 * 1 = 1
    est.update(torch.tensor([1, 1, 2]), step=5)
    # id 1, two copies: gap per copy (5 - 1) / 2 = 2, decay 0.5^2 = 0.25: B1 = 0.25 * 1 + 0.75 * 2 = 1.75
    # id 2, one copy: gap 5 - 0 = 5: B2 = 0.5 * 1 + 0.5 * 5 = 3
    # id 3, never seen: 1 / (5 - 0 + 2) = 1/7 copies per batch
    counts = est.expected_count(ids)
    assert torch.allclose(counts, torch.tensor([1 / 1.75, 1 / 3, 1 / 7], dtype=torch.float64))
    # mean batch size (2 + 1 + 3) / 3 = 2 -> probability = copies per batch / 2
    assert est.mean_batch_size == 2.0
    assert torch.allclose(est.probability(ids), torch.tensor([2 / 7, 1 / 6, 1 / 14], dtype=torch.float64))
    assert torch.allclose(est.log_probability(ids), torch.tensor([2 / 7, 1 / 6, 1 / 14]).log())


def test_single_copies_follow_the_papers_update():
    # One copy per sighting: B <- (1 - a) B + a (t - A), exactly Algorithm 2 of Yi et al.
    est = StreamingFrequencyEstimator(n_buckets=64, alpha=0.1, seed=1)
    b = None
    last = -1
    for step in (0, 3, 4, 10, 12):
        est.update(torch.tensor([42]), step)
        b = float(step - last) if b is None else 0.9 * b + 0.1 * (step - last)
        last = step
    assert est.expected_count(torch.tensor([42])).item() == pytest.approx(1 / b)


def test_tracks_exact_counts_on_a_zipf_stream():
    g = torch.Generator().manual_seed(0)
    n_items, batch, steps = 1000, 256, 1500
    p = torch.arange(1, n_items + 1, dtype=torch.float64) ** -1.1
    p /= p.sum()
    est = StreamingFrequencyEstimator(n_buckets=1 << 16, alpha=0.005, seed=0)
    counts = torch.zeros(n_items + 1, dtype=torch.float64)
    for step in range(steps):
        ids = torch.multinomial(p, batch, replacement=True, generator=g) + 1  # item indices 1..n
        est.update(ids, step)
        counts += torch.bincount(ids, minlength=n_items + 1)
    top = torch.arange(1, 21)  # the 20 most popular items: 16% down to 0.6% of examples
    exact = exact_log_q(counts)[top].double().exp()
    rel = (est.probability(top) - exact).abs() / exact
    assert rel.max() < 0.2, rel
    assert rel.mean() < 0.08, rel
    # The most popular item turns up ~40 times per batch: the estimate must count copies, not batches.
    assert est.expected_count(torch.tensor([1])).item() == pytest.approx(batch * p[0].item(), rel=0.15)


def test_state_dict_round_trips_through_weights_only_load():
    est = StreamingFrequencyEstimator(n_buckets=256, alpha=0.05, seed=3)
    for step in range(20):
        est.update(torch.tensor([1, 2, 2, step % 5 + 3]), step)
    buf = io.BytesIO()
    torch.save(est.state_dict(), buf)
    buf.seek(0)
    again = StreamingFrequencyEstimator(n_buckets=256, alpha=0.05, seed=3)
    again.load_state_dict(torch.load(buf, weights_only=True))
    ids = torch.arange(0, 10)
    assert torch.equal(est.probability(ids), again.probability(ids))
    est.update(torch.tensor([4]), 25)
    again.update(torch.tensor([4]), 25)
    assert torch.equal(est.probability(ids), again.probability(ids))
    with pytest.raises(FrequencyError, match="n_buckets"):
        StreamingFrequencyEstimator(n_buckets=128, alpha=0.05, seed=3).load_state_dict(est.state_dict())


def test_table_gives_one_log_q_per_item_index():
    est = StreamingFrequencyEstimator(n_buckets=1024, alpha=0.5, seed=0)
    est.update(torch.tensor([1, 1, 2]), 0)
    table = est.table(3)
    assert table.shape == (4,) and table.dtype == torch.float32
    assert torch.isfinite(table).all()
    assert table[1] > table[2] > table[3]  # two copies > one copy > never seen


def test_exact_log_q_by_hand():
    # counts [0, 3, 1]: total 4; the zero is floored to 1 -> log [1/4, 3/4, 1/4]
    got = exact_log_q(torch.tensor([0, 3, 1]))
    assert torch.allclose(got, torch.tensor([math.log(0.25), math.log(0.75), math.log(0.25)]))


def test_bad_input_is_refused():
    est = StreamingFrequencyEstimator(n_buckets=16, alpha=0.1, seed=0)
    with pytest.raises(FrequencyError, match="no batch"):
        est.probability(torch.tensor([1]))
    est.update(torch.tensor([1]), 5)
    with pytest.raises(FrequencyError, match="before the last step"):
        est.update(torch.tensor([1]), 4)
    with pytest.raises(FrequencyError, match="sum to zero"):
        exact_log_q(torch.zeros(3))
    with pytest.raises(FrequencyError, match="alpha"):
        StreamingFrequencyEstimator(n_buckets=16, alpha=1.5)
