"""Ranking metrics worked out by hand (tasks/evaluate_ranker.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from towerflow.config import RANKER_HEADS
from towerflow.tasks.evaluate_ranker import auc, evaluate_ranking, gauc, hit_at_k


def test_auc_by_hand():
    # positives 0.9, 0.3 vs negatives 0.8, 0.1: 0.9 beats both, 0.3 beats 0.1 only -> 3 of 4 pairs
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.3, 0.1])) == 0.75
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5  # a tie counts one half
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_gauc_by_hand():
    users = np.array([1, 1, 1, 2, 2, 3])
    labels = np.array([1, 0, 0, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.95, 0.2, 0.1, 0.0])
    # user 1: 0.9 beats 0.1, loses to 0.95 -> 0.5 over 3 rows; user 2: 1.0 over 2 rows; user 3: one class, skipped
    assert gauc(labels, scores, users) == pytest.approx((0.5 * 3 + 1.0 * 2) / 5)


def test_hit_at_3_by_hand():
    request = np.array([0, 0, 0, 0, 0, 1, 1])
    scores = np.array([5, 4, 3, 2, 1, 1, 2], dtype=float)
    labels = np.array([0, 1, 0, 1, 0, 1, 0])
    # request 0: positives ranked 2nd (hit) and 4th (miss); request 1: the positive ranked 2nd (hit) -> 2 / 3
    assert hit_at_k(labels, scores, request) == pytest.approx(2 / 3)
    # ties keep row order: all equal, the positive in row 3 of its request is 4th -> miss
    assert hit_at_k(np.array([0, 0, 0, 1]), np.zeros(4), np.zeros(4, dtype=int)) == 0.0
    assert math.isnan(hit_at_k(np.zeros(3), np.zeros(3), np.zeros(3, dtype=int)))


def test_a_single_score_is_negated_for_the_negative_heads():
    labels = np.zeros((4, len(RANKER_HEADS)), dtype=np.float32)
    labels[0, RANKER_HEADS.index("click")] = 1
    labels[3, RANKER_HEADS.index("hide")] = 1
    score = np.array([0.9, 0.5, 0.4, 0.1])
    m = evaluate_ranking(labels, np.zeros(4, dtype=int), np.array([1, 1, 2, 2]), score)
    assert m["auc/click"] == 1.0 and m["auc/hide"] == 1.0  # the hidden item scores lowest: a perfect hide AUC
    assert m["hit@3/click"] == 1.0 and m["hit@3/hide"] == 0.0  # ranked last of 4: out of the top 3
    assert math.isnan(m["auc/save"]) and m["auc/mean"] == 1.0
    heads = np.tile(score[:, None], (1, len(RANKER_HEADS)))
    assert evaluate_ranking(labels, np.zeros(4, dtype=int), np.array([1, 1, 2, 2]), score, heads)["auc/hide"] == 0.0
