"""serving/cooccurrence.py: the evaluation's co-occurrence baseline as /recommend's second generator, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from towerflow.serving.cooccurrence import candidates
from towerflow.tasks.build_examples import SequenceExamples
from towerflow.tasks.evaluate import CooccurrenceBaseline
from towerflow.tasks.history import ACTION_INDEX
from towerflow.tasks.vocabulary import Vocab

C, S, K = ACTION_INDEX["click"], ACTION_INDEX["save"], ACTION_INDEX["skip"]
VOCAB = Vocab(item_ids=np.array([10, 20, 30, 40, 50], dtype=np.int64), user_ids=np.arange(1, 5, dtype=np.int64),
              categories=["c"], genres=[], demographic_fields=[], demographic_values=[])


@pytest.fixture(scope="module")
def base() -> CooccurrenceBaseline:
    # sources -> target: {1, 2} -> 3; {1, context 4} -> 3; nothing (a skip is no source) -> 5; {1} -> 5
    # so C[1] = {3: 2, 5: 1}, C[2] = {3: 1}, C[4] = {3: 1}; popularity 3: 2, 5: 2 -> tie-break 2/3 for both
    train = SequenceExamples(
        user_idx=np.arange(1, 5), hist_items=np.array([[0, 1, 2], [0, 0, 1], [0, 0, 2], [0, 0, 1]]),
        hist_actions=np.array([[0, C, C], [0, 0, C], [0, 0, K], [0, 0, S]]), hist_gaps=np.zeros((4, 3), np.int64),
        context_items=np.array([0, 4, 0, 0]), surface=np.zeros(4, np.int64), target_items=np.array([3, 3, 5, 5]),
        ts=np.arange(4))
    fitted = CooccurrenceBaseline.fit(train, 5)
    assert fitted.cooccurrence(1) == {3: 2.0, 5: 1.0} and fitted.cooccurrence(2) == {3: 1.0}
    return CooccurrenceBaseline(fitted.indptr, fitted.cols, fitted.vals, fitted.popularity, dense_max_items=0)


def test_scores_sum_over_the_users_sources(base):
    hist, acts = np.array([0, 1, 2]), np.array([0, C, S])
    out = candidates(base, VOCAB, hist, acts, 0, 5, np.array([10, 20]))  # items 1 and 2 (ids 10, 20) seen
    # item 3: C[1,3] + C[2,3] + 2/3 = 3.667; item 5: C[1,5] + 2/3 = 1.667; nothing else co-occurs
    assert [o["item_id"] for o in out] == [30, 50]
    assert [o["score"] for o in out] == pytest.approx([3 + 2 / 3, 1 + 2 / 3])
    assert [o["item_id"] for o in candidates(base, VOCAB, hist, acts, 0, 1, np.array([10, 20]))] == [30]


def test_context_is_a_source_never_a_candidate_and_negatives_are_no_sources(base):
    out = candidates(base, VOCAB, np.array([0, 0, 2]), np.array([0, 0, K]), 4, 5, np.zeros(0, np.int64))
    assert out == [{"item_id": 30, "score": pytest.approx(1 + 2 / 3)}]  # only the context (4) counts
    assert candidates(base, VOCAB, np.array([0, 0, 2]), np.array([0, 0, K]), 0, 5, np.zeros(0, np.int64)) == []
    out = candidates(base, VOCAB, np.array([0, 0, 1]), np.array([0, 0, C]), 0, 5, np.array([30, 999]))
    assert out == [{"item_id": 50, "score": pytest.approx(1 + 2 / 3)}]  # 30 excluded; an unknown id changes nothing
