"""The in-batch softmax loss against logits worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from towerflow.models.loss import LossInputError, in_batch_softmax_loss, mixed_negatives_log_q, softmax_logits

# Two users, two positives. With temperature 0.5 the logits u @ v.T / 0.5 are
#   row 0: [1, 0.6] / 0.5 = [2, 1.2]      (positive in column 0)
#   row 1: [0, 0.8] / 0.5 = [0, 1.6]      (positive in column 1)
U2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
V2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
IDS2 = torch.tensor([11, 12])


def _close(loss: torch.Tensor, value: float) -> bool:
    return bool(torch.isclose(loss, torch.tensor(value), atol=1e-5))


def test_two_by_two_without_logq():
    # row 0: -log(e^2 / (e^2 + e^1.2)) = log(1 + e^-0.8) = 0.371101
    # row 1: -log(e^1.6 / (e^0 + e^1.6)) = log(1 + e^-1.6) = 0.183901
    loss = in_batch_softmax_loss(U2, V2, IDS2, None, 0.5)
    assert _close(loss, (0.371101 + 0.183901) / 2)
    assert _close(loss, (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))) / 2)


def test_two_by_two_with_logq_subtracts_log_q_per_column():
    # q = [0.5, 0.1]: column j gets -log q_j, so the popular column 0 is pushed down.
    # row 0: logits [2 - log .5, 1.2 - log .1] = [2.693147, 3.502585] -> log(1 + e^0.809438) = 1.177622
    # row 1: logits [0 - log .5, 1.6 - log .1] = [0.693147, 3.902585] -> log(1 + e^-3.209438) = 0.039585
    log_q = torch.tensor([math.log(0.5), math.log(0.1)])
    loss = in_batch_softmax_loss(U2, V2, IDS2, log_q, 0.5)
    assert _close(loss, (1.177622 + 0.039585) / 2)


def test_constant_shift_of_log_q_changes_nothing_in_batch():
    log_q = torch.tensor([math.log(0.5), math.log(0.1)])
    a = in_batch_softmax_loss(U2, V2, IDS2, log_q, 0.5)
    b = in_batch_softmax_loss(U2, V2, IDS2, log_q + math.log(256), 0.5)
    assert torch.isclose(a, b)


def test_accidental_hit_is_masked():
    # Rows 0 and 2 have the same positive item (id 7), so column 2 is not a negative for row 0, nor column 0
    # for row 2. Temperature 1, logits u @ v.T = [[1, 0, 1], [0, 1, 0], [1, 0, 1]].
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ids = torch.tensor([7, 9, 7])
    logits = softmax_logits(u, v, ids, None, 1.0)
    assert logits[0, 2] == float("-inf") and logits[2, 0] == float("-inf")
    assert torch.isfinite(logits.diagonal()).all()
    # row 0 over columns {0, 1}: log(1 + e^-1) = 0.313262
    # row 1 over all three:      -1 + log(1 + e + 1) = log(1 + 2 e^-1) = 0.551445
    # row 2 over columns {1, 2}: log(1 + e^-1) = 0.313262
    loss = in_batch_softmax_loss(u, v, ids, None, 1.0)
    assert _close(loss, (0.313262 + 0.551445 + 0.313262) / 3)
    # Unmasked, row 0 would be log(2 + e^-1) = 0.861995: the mask matters.
    unmasked = in_batch_softmax_loss(u, v, torch.tensor([7, 9, 8]), None, 1.0)
    assert _close(unmasked, (0.861995 + 0.551445 + 0.861995) / 3)


def test_one_mixed_negative_with_its_own_log_q():
    # One uniform negative n = [0, 1] (id 5). Its logits / 0.5: row 0: 0, row 1: 2.
    neg_v = torch.tensor([[0.0, 1.0]])
    neg_ids = torch.tensor([5])
    # Without logQ: row 0: log(1 + e^(1.2-2) + e^(0-2)) = log(1 + 0.449329 + 0.135335) = 0.460373
    #               row 1: log(1 + e^(0-1.6) + e^(2-1.6)) = log(1 + 0.201897 + 1.491825) = 0.990924
    loss = in_batch_softmax_loss(U2, V2, IDS2, None, 0.5, neg_v, neg_ids)
    assert _close(loss, (0.460373 + 0.990924) / 2)
    # With logQ: in-batch q = [0.5, 0.1], the negative's q = 0.2 (its column gets + log 5 = + 1.609438).
    # row 0 logits [2.693147, 3.502585, 1.609438]: -2.693147 + log(e^2.693147 + e^3.502585 + e^1.609438)
    #   = log(1 + e^0.809438 + e^-1.083709) = log(1 + 2.246645 + 0.338386) = 1.276754
    # row 1 logits [0.693147, 3.902585, 3.609438]: log(1 + e^-3.209438 + e^-0.293147)
    #   = log(1 + 0.040379 + 0.745906) = 0.580142
    log_q = torch.tensor([math.log(0.5), math.log(0.1)])
    loss = in_batch_softmax_loss(U2, V2, IDS2, log_q, 0.5, neg_v, neg_ids, torch.tensor([math.log(0.2)]))
    assert _close(loss, (1.276754 + 0.580142) / 2)


def test_mixed_negative_equal_to_the_positive_is_masked():
    # The sampled negative is item 12, row 1's own positive: it must not count as a negative for row 1.
    neg_v = torch.tensor([[0.0, 1.0]])
    logits = softmax_logits(U2, V2, IDS2, None, 0.5, neg_v, torch.tensor([12]))
    assert logits.shape == (2, 3)
    assert logits[1, 2] == float("-inf") and logits[0, 2] == 0.0
    # row 0 as in the mixed test (0.460373); row 1 back to the plain 2 x 2 value (0.183901).
    loss = in_batch_softmax_loss(U2, V2, IDS2, None, 0.5, neg_v, torch.tensor([12]))
    assert _close(loss, (0.460373 + 0.183901) / 2)


def test_mixed_negatives_log_q_is_expected_copies():
    assert mixed_negatives_log_q(4, 1000) == pytest.approx(math.log(0.004))


def test_bad_inputs_name_the_problem():
    with pytest.raises(LossInputError, match="temperature"):
        in_batch_softmax_loss(U2, V2, IDS2, None, 0.0)
    with pytest.raises(LossInputError, match="both columns"):
        in_batch_softmax_loss(U2, V2, IDS2, torch.zeros(2), 1.0, U2[:1], torch.tensor([3]))
    with pytest.raises(LossInputError, match="log_q must have shape"):
        in_batch_softmax_loss(U2, V2, IDS2, torch.zeros(3), 1.0)
    with pytest.raises(LossInputError, match="NaN or inf"):
        in_batch_softmax_loss(U2, V2, IDS2, torch.tensor([0.0, float("-inf")]), 1.0)
    with pytest.raises(LossInputError, match="item_ids"):
        in_batch_softmax_loss(U2, V2, torch.tensor([1, 2, 3]), None, 1.0)
