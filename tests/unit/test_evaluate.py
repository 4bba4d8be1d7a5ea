"""Full-corpus metrics, exclusions, slices and baselines against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from towerflow.models.batch import ItemFeatures
from towerflow.tasks.build_examples import ACTION_INDEX, Examples, SeenItems, SequenceExamples, Vocab
from towerflow.tasks.evaluate import (
    CooccurrenceBaseline,
    EvaluationError,
    PopularityBaseline,
    baseline_metrics,
    baseline_ranks,
    evaluate_slices,
    metrics_from_ranks,
    retrieval_metrics,
    target_ranks,
    vector_ranks,
)

C, S, K = ACTION_INDEX["click"], ACTION_INDEX["save"], ACTION_INDEX["skip"]

# 5 items scored by a 1-d dot product; row 0 is padding and must never be ranked, however high it scores.
ITEMS = np.array([[100.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
USERS = np.array([[1.0], [1.0], [-1.0]])  # users 0, 1 rank items 1 > 2 > ... > 5; user 2 the reverse
TARGETS = np.array([1, 2, 2])  # ranks 1, 2 and 4 (for user 2, items 5, 4, 3 score higher than item 2)


def test_ranks_and_metrics_on_a_toy_with_known_ranks():
    assert vector_ranks(USERS, ITEMS, TARGETS).tolist() == [1, 2, 4]
    m = retrieval_metrics(USERS, ITEMS, TARGETS, ks=(1, 3, 5))
    assert m["n"] == 3
    assert m["recall@1"] == pytest.approx(1 / 3) and m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 3)  # rank 2 -> 1/log2(3), rank 4 > K -> 0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert m["hr@5"] == m["recall@5"] == 1.0  # one target per row: recall@K == hr@K


def test_seen_items_are_removed_but_never_the_target_itself():
    seen = SeenItems.from_lists([[], [1], [5, 2]])
    # user 1: item 1 removed -> target 2 moves to rank 1; user 2: item 5 removed, target 2 listed but kept -> 3
    assert vector_ranks(USERS, ITEMS, TARGETS, seen).tolist() == [1, 1, 3]
    m = retrieval_metrics(USERS, ITEMS, TARGETS, (seen.indptr, seen.indices), ks=(1,))
    assert m["recall@1"] == pytest.approx(2 / 3)


def test_ties_count_against_the_target_and_chunking_changes_nothing():
    flat = np.ones((6, 2))
    assert vector_ranks(USERS.repeat(2, axis=1), flat, TARGETS).tolist() == [5, 5, 5]
    assert vector_ranks(USERS, ITEMS, TARGETS, chunk_rows=1).tolist() == [1, 2, 4]
    assert vector_ranks(torch.tensor(USERS), torch.tensor(ITEMS), TARGETS).tolist() == [1, 2, 4]


def test_bad_inputs_raise_evaluation_errors():
    with pytest.raises(EvaluationError, match="NaN"):
        retrieval_metrics(np.array([[np.nan], [1.0], [1.0]]), ITEMS, TARGETS)
    with pytest.raises(EvaluationError, match="item indices"):
        vector_ranks(USERS, ITEMS, np.array([0, 1, 2]))
    with pytest.raises(EvaluationError, match="rows"):
        vector_ranks(USERS, ITEMS, TARGETS, SeenItems.from_lists([[1]]))


def _rows(hist_items, hist_actions, context, targets, surface=None) -> SequenceExamples:
    n = len(targets)
    hist_items, hist_actions = np.array(hist_items), np.array(hist_actions)
    return SequenceExamples(
        user_idx=np.arange(1, n + 1),
        hist_items=hist_items,
        hist_actions=hist_actions,
        hist_gaps=(hist_items > 0).astype(np.int64),
        context_items=np.array(context),
        surface=np.zeros(n, dtype=np.int64) if surface is None else np.array(surface),
        target_items=np.array(targets),
        ts=np.arange(n),
    )


def test_slices_by_surface_and_short_history():
    ex = _rows(
        [[0, 0, 0], [7, 8, 9], [0, 0, 3]], [[0, 0, 0], [C, C, C], [0, 0, C]], [0, 0, 0], [1, 2, 2], surface=[0, 1, 1]
    )
    out = evaluate_slices(np.array([1, 2, 4]), ex, ks=(1, 3), short_history_max=1)
    assert set(out) == {"all", "surface=homefeed", "surface=related", "short_history"}  # no search rows
    assert out["surface=homefeed"]["n"] == 1 and out["surface=homefeed"]["recall@1"] == 1.0
    assert out["surface=related"]["recall@3"] == 0.5
    assert out["short_history"]["n"] == 2 and out["short_history"]["recall@1"] == 0.5  # rows 0 and 2
    assert metrics_from_ranks(np.array([], dtype=np.int64), ks=(1,))["n"] == 0


# Train rows (L = 3): sources are distinct positive history items plus the context; skips never count.
TRAIN = _rows(
    hist_items=[[0, 1, 2], [0, 1, 4], [1, 1, 5], [0, 0, 3], [0, 0, 2]],
    hist_actions=[[0, C, C], [0, C, K], [C, S, C], [0, 0, C], [0, 0, C]],
    context=[0, 2, 0, 3, 0],
    targets=[3, 3, 4, 5, 2],
)
HOLDOUT = _rows(
    hist_items=[[0, 1, 5], [0, 0, 0], [0, 0, 4]],
    hist_actions=[[0, C, C], [0, 0, 0], [0, 0, K]],
    context=[0, 2, 0],
    targets=[4, 3, 5],
)
HOLDOUT_SEEN = SeenItems.from_lists([[1, 5], [], []])


def test_popularity_baseline_counts_exactly():
    pop = PopularityBaseline.fit(TRAIN, n_items=5)
    assert pop.scores().tolist() == [0, 0, 1, 2, 1, 1]
    # row 0: item 1 seen; item 3 (2) beats target 4 (1), item 2 ties -> rank 3. row 1: item 3 is the top -> 1.
    # row 2: item 3 beats target 5, items 2 and 4 tie with it -> rank 4.
    assert target_ranks(pop.score_rows, HOLDOUT.target_items, 5, HOLDOUT_SEEN).tolist() == [3, 1, 4]


@pytest.mark.parametrize("dense_max_items", [8192, 0])  # dense matrix path and sparse CSR path
def test_cooccurrence_baseline_on_a_hand_counted_toy(dense_max_items):
    cooc = CooccurrenceBaseline.fit(TRAIN, n_items=5)
    cooc.dense_max_items = dense_max_items
    # pairs: row 0 (1,3) (2,3); row 1 (1,3) (2,3) via the context, item 4 was skipped; row 2 (1,4) (5,4), item 1
    # once; row 3 (3,5) once (history and context are the same item); row 4 (2,2) is a self pair, dropped
    assert cooc.cooccurrence(1) == {3: 2.0, 4: 1.0}
    assert cooc.cooccurrence(2) == {3: 2.0}
    assert cooc.cooccurrence(3) == {5: 1.0} and cooc.cooccurrence(5) == {4: 1.0} and cooc.cooccurrence(4) == {}
    scores = cooc.scorer(HOLDOUT)(np.array([0, 1, 2]))
    # popularity tie-break = count / (max count 2 + 1): items 1..5 -> 0, 1/3, 2/3, 1/3, 1/3
    assert scores[0, 1:].tolist() == pytest.approx([0, 1 / 3, 2 + 2 / 3, 2 + 1 / 3, 1 / 3])
    assert scores[1, 1:].tolist() == pytest.approx([0, 1 / 3, 2 + 2 / 3, 1 / 3, 1 / 3])
    # row 0: item 3 beats target 4 -> 2; row 1: target 3 on top -> 1; row 2: no sources, popularity only -> 4
    ranks = target_ranks(cooc.scorer(HOLDOUT), HOLDOUT.target_items, 5, HOLDOUT_SEEN)
    assert ranks.tolist() == [2, 1, 4]


def test_baseline_metrics_use_the_holdout_and_its_exclusions():
    vocab = Vocab(np.arange(10, 15), np.arange(1, 4), ["c"], [], [], [])
    feats = ItemFeatures(category=torch.ones(6, dtype=torch.long), genres=torch.zeros(6, 1, dtype=torch.long))
    ex = Examples(TRAIN, HOLDOUT, vocab, feats, np.zeros((4, 0), dtype=np.int64), HOLDOUT_SEEN)
    out = baseline_metrics(ex, ks=(1, 2))
    assert out["popularity"]["hr@1"] == pytest.approx(1 / 3) and out["popularity"]["hr@2"] == pytest.approx(1 / 3)
    assert out["cooccurrence"]["hr@2"] == pytest.approx(2 / 3)
    assert out["cooccurrence"]["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)


def test_baselines_compared_with_a_refit_model_learn_from_its_validation_rows_too():
    """Users 1-3 click 10u+1, 10u+2 on day 0 (train), item 99 on day 1 (validation) and 10u+3 on day 2 (holdout);
    user 4 clicks 41, 42 on day 0, 43 on day 1, and 99 on day 2 (holdout). Fitted on train only, 99 has no count:
    user 4's target ties with the 9 items it has not seen (11-13, 21-23, 31-33) -> rank 10. Fitted also on the
    refit's rows (the validation day: 99 three times, 43 once), 99 is the most popular item -> rank 1."""
    from dataclasses import replace

    import pandas as pd

    from towerflow.config import ExamplesConfig
    from towerflow.tasks.build_examples import build_examples

    start = pd.Timestamp("2026-01-01", tz="UTC")
    clicks = [(u, 10 * u + j, day) for u in (1, 2, 3) for j, day in ((1, 0), (2, 0), (3, 2))]
    clicks += [(u, 99, 1) for u in (1, 2, 3)] + [(4, 41, 0), (4, 42, 0), (4, 43, 1), (4, 99, 2)]
    events = pd.DataFrame([(f"e{i}", u, it, "click", start + pd.Timedelta(days=d, minutes=i), "homefeed", None, None)
                           for i, (u, it, d) in enumerate(clicks)],
                          columns=["event_id", "user_id", "item_id", "action", "ts", "surface", "context_item_id",
                                   "query"])
    item_ids = sorted({it for _, it, _ in clicks})
    items = pd.DataFrame({"item_id": item_ids, "category": "c", "genres": None, "title": None,
                          "created_ts": start - pd.Timedelta(days=30)})
    users = pd.DataFrame({"user_id": [1, 2, 3, 4], "signup_ts": start - pd.Timedelta(days=30), "country": "xx"})
    ex = build_examples(events, users, items, start + pd.Timedelta(days=3), ExamplesConfig(max_seq_len=8))
    assert ex.meta["split"] == "time"
    user4 = int(np.flatnonzero(ex.vocab.user_ids[ex.holdout.user_idx - 1] == 4)[0])
    assert baseline_ranks(ex)["popularity"][user4] == 10
    assert baseline_ranks(ex, refit_rows=True)["popularity"][user4] == 1
    with pytest.raises(EvaluationError, match="only be scored on the holdout"):
        baseline_ranks(ex, on="valid", refit_rows=True)
    # examples whose refit rows were dropped (augment_examples(refit=False)) cannot stand in: refused, not train-only
    with pytest.raises(EvaluationError, match="need the refit's rows"):
        baseline_ranks(replace(ex, refit_extra=None), refit_rows=True)
