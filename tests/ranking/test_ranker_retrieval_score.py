"""The ranker's retrieval score (models/ranker.py retrieval_features): u . v of the candidate and whether the request
has a u, by hand; in the DCN input only when configured; the shared (serving) path equals the per-row one; a ranker
saved before the flag loads without it; a missing u is refused; the blended score adds it with
``retrieval_weight``, by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from towerflow.config import RankerConfig, RankerTrainConfig
from towerflow.models.ranker import (
    N_RETRIEVAL,
    Ranker,
    RankerBatch,
    blended_score,
    load_ranker,
    retrieval_features,
    save_ranker,
    score_candidates,
)
from towerflow.tasks.history import ACTION_INDEX
from towerflow.tasks.train import TrainError

TABLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])  # row 0: padding / an unknown item
CLICK, HIDE = ACTION_INDEX["click"], ACTION_INDEX["hide"]
SMALL = RankerConfig(max_seq_len=4, latest_k=2, action_dim=2, item_dim=3, mlp_hidden=(8,), dropout=0.0,
                     retrieval_score=True)


def _batch(cands, u) -> RankerBatch:
    n = len(cands)
    return RankerBatch(torch.tensor(cands), torch.zeros(n, dtype=torch.int64), torch.tensor([[0, 0, 1, 2]] * n),
                       torch.tensor([[0, 0, CLICK, HIDE]] * n), torch.zeros((n, 4)), user_vector=u)


def test_retrieval_features_by_hand():
    u = torch.tensor([[3.0, 4.0]])  # one request's u for every row
    assert retrieval_features(TABLE, torch.tensor([1, 2, 3, 0]), u).tolist() == [[3.0, 1.0], [8.0, 1.0],
                                                                                   [3.5, 1.0], [0.0, 1.0]]
    # per-row vectors; a zero u (the popularity path: no vector) scores 0 and says so
    got = retrieval_features(TABLE, torch.tensor([1, 2]), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert got.tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_the_dcn_sees_the_score_only_when_configured():
    on, off = Ranker(TABLE, SMALL), Ranker(TABLE, SMALL.model_copy(update={"retrieval_score": False}))
    assert on.dcn.cross[0].w.in_features == off.dcn.cross[0].w.in_features + N_RETRIEVAL
    seen = []
    on.eval().dcn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    on(_batch([2, 3], torch.tensor([[3.0, 4.0], [0.0, 0.0]])))
    torch.testing.assert_close(seen[0][:, -N_RETRIEVAL:], torch.tensor([[8.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="retriever's user vector of width 2"):
        on(_batch([2], None))
    with pytest.raises(ValueError, match=r"got \(1, 3\)"):
        on(_batch([2], torch.zeros((1, 3))))


def test_one_requests_candidates_score_as_rows_do():
    torch.manual_seed(0)
    model = Ranker(TABLE, SMALL).eval()
    u = np.array([0.3, -0.7], np.float32)
    probs, _ = score_candidates(model, np.array([1, 2, 3]), 0, np.array([0, 0, 1, 2]), np.array([0, 0, CLICK, HIDE]),
                                np.zeros(4, np.float32), user_vector=u)
    rows = torch.sigmoid(model(_batch([1, 2, 3], torch.from_numpy(np.stack([u] * 3))))).detach().numpy()
    np.testing.assert_allclose(probs, rows, rtol=1e-5, atol=1e-6)
    # the score moves the output: another u, other probabilities
    other, _ = score_candidates(model, np.array([1, 2, 3]), 0, np.array([0, 0, 1, 2]), np.array([0, 0, CLICK, HIDE]),
                                np.zeros(4, np.float32), user_vector=-u)
    assert not np.allclose(probs, other)


def test_a_ranker_saved_before_the_flag_loads_without_the_score(tmp_path):
    torch.manual_seed(0)
    old, new = (Ranker(TABLE, SMALL.model_copy(update={"retrieval_score": on})).eval() for on in (False, True))
    for model, name in ((old, "old"), (new, "new")):
        save_ranker(model, tmp_path / name, release_id="rel-1")
    written = tmp_path / "old" / "ranker.json"
    meta = json.loads(written.read_text())
    del meta["ranker_config"]["retrieval_score"]  # as written before the field existed
    written.write_text(json.dumps(meta))
    back = load_ranker(tmp_path / "old", TABLE, release_id="rel-1")
    assert back.cfg.retrieval_score is False
    torch.testing.assert_close(back(_batch([1, 3], None)), old(_batch([1, 3], None)))
    assert load_ranker(tmp_path / "new", TABLE).cfg.retrieval_score is True


def test_training_refuses_examples_without_user_vectors():
    from towerflow.tasks.ranking_examples import RankingExamples
    from towerflow.tasks.train_ranker import train_ranker

    n = 4
    ex = RankingExamples(request=np.arange(n), user_id=np.ones(n, np.int64), ts_us=np.arange(n), surface=np.zeros(
        n, np.int64), item=np.array([1, 2, 3, 1]), labels=np.zeros((n, 5), np.float32), hist_items=np.zeros((n, 4),
        np.int64), hist_actions=np.zeros((n, 4), np.int64), hist_age_s=np.zeros((n, 4), np.float32))
    with pytest.raises(TrainError, match="build them with a retriever"):
        train_ranker(ex, TABLE.numpy(), RankerTrainConfig(model=SMALL, epochs=1), log=False)


def test_retrieved_candidates_join_their_request_as_rows_without_engagement():
    from towerflow.tasks.ranking_examples import RankingExamples, with_retrieved_candidates

    # items 1..5; u = (1, 0) scores them 1.0, 0.9, 0.1, -1.0, 0.5: the top 3 are items 1, 2, 5
    table = np.array([[0, 0], [1, 0], [0.9, 0.1], [0.1, 0.9], [-1, 0], [0.5, 0.5]], np.float32)
    labels = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]], np.float32)
    ex = RankingExamples(request=np.array([0, 1]), user_id=np.array([7, 8]), ts_us=np.array([10, 20]),
                         surface=np.array([0, 2]), item=np.array([1, 3]), labels=labels,
                         hist_items=np.array([[0, 2], [0, 1]]), hist_actions=np.array([[0, CLICK], [0, CLICK]]),
                         hist_age_s=np.zeros((2, 2), np.float32),
                         user_vector=np.array([[1, 0], [0, 0]], np.float32))  # request 1: no u
    # request 0 showed item 1 and its sequence holds item 2: of the top 3 only item 5 is left (asked for 2)
    got = with_retrieved_candidates(ex, table, per_request=2, depth=3)
    assert got.request.tolist() == [0, 0, 1] and got.item.tolist() == [1, 5, 3]
    assert got.labels.tolist() == [labels[0].tolist(), [0.0] * 5, labels[1].tolist()]
    assert got.user_id.tolist() == [7, 7, 8] and got.ts_us.tolist() == [10, 10, 20]
    np.testing.assert_array_equal(got.hist_items[1], ex.hist_items[0])
    np.testing.assert_array_equal(got.user_vector[1], [1, 0])
    assert with_retrieved_candidates(ex, table, per_request=0, depth=3) is ex


def test_the_blended_score_adds_the_weighted_retrieval_score_by_hand():
    from towerflow.tasks.ranking_examples import RankingExamples
    from towerflow.tasks.train_ranker import ranking_score

    probs = torch.tensor([[0.5, 0.2, 0.1, 0.4, 0.3]] * 2)
    heads = RankerConfig().score_weights  # 1 x 0.5 + 2 x 0.2 + 3 x 0.1 - 0.5 x 0.4 - 3 x 0.3 = 0.1 per row
    assert blended_score(probs, heads).tolist() == pytest.approx([0.1, 0.1])
    assert blended_score(probs, heads, torch.tensor([8.0, 3.5]), 2.0).tolist() == pytest.approx([16.1, 7.1])
    with pytest.raises(ValueError, match="needs each row's retrieval score"):
        blended_score(probs, heads, None, 2.0)
    # the ranker computes u . v itself: u = (3, 4) -> item 2 (0, 2): 8, item 3 (0.5, 0.5): 3.5
    weighted = Ranker(TABLE, SMALL.model_copy(update={"retrieval_weight": 2.0})).eval()
    u = torch.tensor([[3.0, 4.0]])
    assert weighted.ranking_score(probs, torch.tensor([2, 3]), u).tolist() == pytest.approx([16.1, 7.1])
    assert Ranker(TABLE, SMALL).ranking_score(probs, torch.tensor([2, 3]), u).tolist() == pytest.approx([0.1, 0.1])
    # serving's path ranks by it: 2 x u . v over the heads' blend of the probabilities it returns
    p, score = score_candidates(weighted, np.array([2, 3]), 0, np.array([0, 0, 1, 2]), np.array([0, 0, CLICK, HIDE]),
                                np.zeros(4, np.float32), user_vector=u[0].numpy())
    np.testing.assert_allclose(score, blended_score(torch.from_numpy(p), heads).numpy() + [16.0, 7.0], rtol=1e-6)
    # a candidate the table lacks (row 0: a live item) keeps the score the index found it with, 0.75 -> 0.1 + 1.5
    p_live, score = score_candidates(weighted, np.array([0, 3]), 0, np.array([0, 0, 1, 2]), np.array([0, 0, CLICK, HIDE]),
                                np.zeros(4, np.float32), user_vector=u[0].numpy(), unknown_uv=np.array([0.75, 99.0]))
    np.testing.assert_allclose(score, blended_score(torch.from_numpy(p_live), heads).numpy() + [1.5, 7.0], rtol=1e-6)
    # and the evaluation's (per row, each row's own u)
    ex = RankingExamples(request=np.array([0, 0]), user_id=np.ones(2, np.int64), ts_us=np.zeros(2, np.int64),
                         surface=np.zeros(2, np.int64), item=np.array([2, 3]), labels=np.zeros((2, 5), np.float32),
                         hist_items=np.zeros((2, 4), np.int64), hist_actions=np.zeros((2, 4), np.int64),
                         hist_age_s=np.zeros((2, 4), np.float32), user_vector=np.array([[3.0, 4.0], [1.0, 0.0]],
                                                                                       np.float32))
    # item 3 against u = (1, 0): 0.5 -> 0.1 + 2 x 0.5
    assert ranking_score(weighted, ex, probs.numpy()).tolist() == pytest.approx([16.1, 1.1])
    with pytest.raises(ValueError, match="retrieval_weight .* needs retrieval_score"):
        RankerConfig(retrieval_weight=1.0)
