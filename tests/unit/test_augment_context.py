"""Pseudo-context: which rows get one, which item it is, the rate, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towerflow.config import AugmentConfig
from towerflow.models.batch import ItemFeatures
from towerflow.tasks.augment_context import augment_context
from towerflow.tasks.build_examples import SequenceExamples


def _train(users, ts, targets, context) -> SequenceExamples:
    n = len(targets)
    h = np.zeros((n, 2), dtype=np.int64)
    return SequenceExamples(
        user_idx=np.array(users),
        hist_items=h,
        hist_actions=h.copy(),
        hist_gaps=h.copy(),
        context_items=np.array(context),
        surface=np.zeros(n, dtype=np.int64),
        target_items=np.array(targets),
        ts=np.array(ts),
    )


def _feats(category, dense=None) -> ItemFeatures:
    cat = torch.tensor(category)
    return ItemFeatures(
        category=cat,
        genres=torch.zeros(len(category), 1, dtype=torch.long),
        dense=None if dense is None else torch.tensor(dense, dtype=torch.float32),
    )


# items 1..9; row 0 padding. categories: 1, 2, 4, 9 -> 1; 3, 5 -> 2; 6, 7, 8 -> 3
CATEGORY = [0, 1, 1, 2, 1, 2, 3, 3, 3, 1]
DENSE = [[0, 0], [0, 1], [0, 1], [1, 1], [0, 1], [1, 1], [1, 0], [0, 1], [1, 0.1], [1, 0]]
TRAIN = _train(
    users=[1, 1, 1, 1, 2, 2, 3, 3, 3, 0, 0],
    ts=[0, 60, 70, 10_000, 0, 100, 0, 50, 5_000, 0, 1],
    targets=[1, 2, 4, 3, 3, 5, 1, 2, 3, 6, 7],
    context=[0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0],  # row 2 has real context
)
# Session pairs (target, partner) within 30 min, counted over rows: (1,2) x2 (users 1 and 3), (2,1) x2, and once
# each (1,4) (2,4) (4,1) (4,2) (3,5) (5,3). Only pairs seen in 2 sessions count as corroborated.


def test_every_fallback_with_p_one():
    out, stats = augment_context(TRAIN, _feats(CATEGORY, DENSE), AugmentConfig(pseudo_context_prob=1.0))
    ctx = out.context_items.tolist()
    assert ctx[0] == 2 and ctx[1] == 1 and ctx[6] == 2 and ctx[7] == 1  # corroborated session partners
    assert ctx[2] == 9  # real context untouched
    # item 3 at t=10000 has no session; 3 and 5 share one session only (uncorroborated): the most co-engaged item
    assert ctx[3] == 5 and ctx[4] == 5 and ctx[5] == 3 and ctx[8] == 5
    # user index 0 pools unknown users, never a session; item 6 has no co-engagement: the nearest item of its
    # category by cosine is 8 ([1, 0.1]); item 9 ([1, 0]) is closer but in another category. Item 7 -> 8 too.
    assert ctx[9] == 8 and ctx[10] == 8
    assert stats.n_eligible == 10 and stats.n_drawn == 10
    assert (stats.n_session, stats.n_cooccur, stats.n_content, stats.n_none) == (4, 4, 2, 0)
    assert stats.rate == 1.0
    assert TRAIN.context_items.tolist() == [0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0]  # the input is not modified


@pytest.mark.parametrize(("n_with_2", "want"), [(5, 2), (3, 3)])
def test_session_partner_is_the_best_supported_then_the_previous_engagement(n_with_2, want):
    # users 10.. co-engage items 1 and 2, users 30.. items 1 and 3; user 50 engages 3, 1, 2 within a minute.
    # The row of item 1 (user 50) sees 3 before and 2 after: 2 wins with more support, 3 (previous) on a tie.
    sessions = [(10 + u, [1, 2]) for u in range(n_with_2)] + [(30 + u, [1, 3]) for u in range(3)] + [(50, [3, 1, 2])]
    users = [u for u, items in sessions for _ in items]
    ts = [10 * i for _, items in sessions for i in range(len(items))]
    targets = [i for _, items in sessions for i in items]
    train = _train(users, ts, targets, [0] * len(users))
    out, _ = augment_context(train, _feats([0, 1, 1, 1]), AugmentConfig(pseudo_context_prob=1.0))
    assert out.context_items[-2] == want


def test_content_fallback_without_dense_features_stays_in_category_and_never_picks_the_target():
    feats = _feats(CATEGORY)
    picks = set()
    for seed in range(40):
        out, _ = augment_context(TRAIN, feats, AugmentConfig(pseudo_context_prob=1.0, seed=seed))
        assert out.context_items[9] in (7, 8) and out.context_items[10] in (6, 8)
        picks.add(int(out.context_items[9]))
    assert picks == {7, 8}


def test_item_alone_in_its_category_gets_no_pseudo_context():
    train = _train(users=[0], ts=[0], targets=[1], context=[0])
    out, stats = augment_context(train, _feats([0, 1, 2]), AugmentConfig(pseudo_context_prob=1.0))
    assert out.context_items.tolist() == [0] and stats.n_none == 1 and stats.n_augmented == 0


def test_probability_zero_changes_nothing():
    out, stats = augment_context(TRAIN, _feats(CATEGORY, DENSE), AugmentConfig(pseudo_context_prob=0.0))
    assert out.context_items.tolist() == TRAIN.context_items.tolist() and stats.n_drawn == 0


def test_rate_is_about_p_only_context_less_rows_change_and_seeds_are_deterministic():
    n_users = 10_000
    users = np.repeat(np.arange(1, n_users + 1), 2)
    targets = np.tile([1, 2], n_users)
    ts = np.tile([0, 10], n_users)
    context = np.where(np.arange(2 * n_users) % 4 == 0, 3, 0)  # a quarter of rows have real context
    train = _train(users, ts, targets, context)
    cfg = AugmentConfig(pseudo_context_prob=0.3, seed=5)
    out, stats = augment_context(train, _feats([0, 1, 1, 1]), cfg)
    eligible = context == 0
    changed = out.context_items != context
    assert not changed[~eligible].any()
    assert stats.n_eligible == 15_000 and stats.n_augmented == changed.sum()
    assert stats.rate == pytest.approx(0.3, abs=0.02)  # 15k Bernoulli(0.3) draws: sd 0.004
    assert (out.context_items[changed] != targets[changed]).all()
    again, _ = augment_context(train, _feats([0, 1, 1, 1]), cfg)
    other, _ = augment_context(train, _feats([0, 1, 1, 1]), AugmentConfig(pseudo_context_prob=0.3, seed=6))
    assert np.array_equal(again.context_items, out.context_items)
    assert not np.array_equal(other.context_items, out.context_items)


def test_pseudo_queries_are_words_of_the_targets_text_on_rows_without_context_or_query():
    from towerflow.models.query import encode_texts
    from towerflow.tasks.augment_context import pseudo_queries

    text = ["", "Red shoe topic_a", "Blue hat topic_b", "", "", "", "", "", "", ""]
    train = TRAIN.take(np.arange(5))  # targets 1, 2, 4, 3, 3; row 2 has real context
    query = np.zeros((5, 4), dtype=np.int64)
    query[3] = encode_texts(["hat"])[0]  # row 3 already has a real query (a search row): 4 tokens
    train = type(train)(**{**train.__dict__, "query": query})
    cfg = AugmentConfig(pseudo_context_prob=0.0, pseudo_query_prob=1.0, query_word_dropout=0.0)
    out, stats = augment_context(train, _feats(CATEGORY), cfg, text)
    # rows 0, 1 (targets 1, 2) get their item's whole text; row 4's target (3) has no text: nothing; row 2
    # (context) and row 3 (query) keep theirs
    assert stats.n_pseudo_query == 2
    want = encode_texts(["Red shoe topic_a", "Blue hat topic_b"])
    assert (out.query[:2, : want.shape[1]] == want).all() and not out.query[:2, want.shape[1]:].any()
    assert not out.query[2].any() and not out.query[4].any()
    assert (out.query[3, :4] == query[3]).all()
    assert not train.query[0].any()  # the input is not modified
    # word dropout: every word dropped with p -> one kept, in order; p = 0.5 over many draws keeps about half
    rng = np.random.default_rng(0)
    assert all(len(q.split()) == 1 for q in pseudo_queries(np.array([1] * 20), text, 0.99, rng))
    kept = [len(q.split()) for q in pseudo_queries(np.array([1] * 2000), text, 0.5, rng)]
    assert 1.5 < np.mean(kept) < 1.9  # 3 x 0.5 = 1.5, plus the one kept when all 3 drop (1/8): 1.625
    assert pseudo_queries(np.array([2]), text, 0.0, rng) == ["blue hat topic_b"]
