"""serving/recommend.py: merging generators, ranking by hand, and the serving-side ranker sequence against the
training-side one (train/serve consistency) over a real realtime action store."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from towerflow.config import RankerConfig
from towerflow.contract import conform
from towerflow.models.ranker import Ranker
from towerflow.serving.realtime.live import LiveEvents, merge
from towerflow.serving.realtime.store import SQLiteActionStore
from towerflow.serving.recent_events import RecentEvents
from towerflow.serving.recommend import RankerSequence, merge_candidates, rank, ranker_sequence
from towerflow.tasks.history import EventArrays, to_us
from towerflow.tasks.ranking_examples import build_ranking_examples
from towerflow.tasks.vocabulary import Vocab

T0 = pd.Timestamp("2026-01-05", tz="UTC")


def test_merge_keeps_every_generator_of_an_item_in_first_found_order():
    found = {"two_tower": [{"item_id": 7, "score": 0.9}, {"item_id": 3, "score": 0.5}],
             "cooccurrence": [{"item_id": 3, "score": 4.0}, {"item_id": 11, "score": 2.0},
                              {"item_id": 11, "score": 1.0}]}
    c = merge_candidates(found)
    assert c.item_ids.tolist() == [7, 3, 11]
    assert c.sources == ({"two_tower": 0.9}, {"two_tower": 0.5, "cooccurrence": 4.0}, {"cooccurrence": 2.0})
    assert merge_candidates(found, limit=2).item_ids.tolist() == [7, 3]
    assert len(merge_candidates({})) == 0


def _hand_ranker() -> Ranker:
    """No sequence, no cross layers, no MLP: the click logit is the item's 1-d vector, every other logit 0."""
    table = torch.tensor([[0.0], [0.0], [math.log(3.0)], [-math.log(3.0)]])  # rows 1..3: logits 0, ln 3, -ln 3
    cfg = RankerConfig(use_sequence=False, item_dim=1, surface_dim=1, cross_layers=0, mlp_hidden=(), dropout=0.0)
    model = Ranker(table, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.item_proj.weight.fill_(1.0)  # item_repr = the item's vector
        model.heads.weight[0, 0] = 1.0  # click <- item_repr (input column 0: the candidate comes first)
    return model.eval()


def test_rank_by_hand():
    # p_click = sigmoid(v): 0.5, 0.75, 0.25; other heads sigmoid(0) = 0.5; blended with the default weights
    # (click 1, save 2, conversion 3, skip -0.5, hide -3): p_click + 0.5 * 1.5 = 1.25, 1.5, 1.0
    model = _hand_ranker()
    cands = merge_candidates({"two_tower": [{"item_id": 101, "score": 0.3}, {"item_id": 102, "score": 0.2},
                                            {"item_id": 103, "score": 0.1}]})
    seq = RankerSequence(np.zeros(100, np.int64), np.zeros(100, np.int64), np.zeros(100, np.float32))
    out = rank(model, cands, np.array([1, 2, 3]), 0, seq, k=2)
    assert [r["item_id"] for r in out] == [102, 101]
    assert out[0]["score"] == pytest.approx(1.5) and out[1]["score"] == pytest.approx(1.25)
    assert out[0]["heads"] == pytest.approx({"click": 0.75, "save": 0.5, "conversion": 0.5, "skip": 0.5,
                                             "hide": 0.5})
    assert out[0]["sources"] == {"two_tower": 0.2}
    # a candidate unknown to the ranker (row 0) is scored as its unknown item: logit 0 -> 1.25, after 101 (a tie
    # keeps first-found order)
    out = rank(model, merge_candidates({"g": [{"item_id": 101, "score": 1}, {"item_id": 999, "score": 1}]}),
               np.array([1, 0]), 0, seq, k=5)
    assert [(r["item_id"], round(r["score"], 6)) for r in out] == [(101, 1.25), (999, 1.25)]
    with pytest.raises(ValueError, match="2 ranker rows for 3 candidates"):
        rank(model, cands, np.array([1, 2]), 0, seq, k=2)


def test_rank_uses_the_sequence():
    torch.manual_seed(0)
    cfg = RankerConfig(max_seq_len=6, latest_k=2, action_dim=2, item_dim=3, mlp_hidden=(8,), dropout=0.0)
    model = Ranker(torch.randn(13, 5), cfg).eval()
    cands = merge_candidates({"g": [{"item_id": i, "score": 0.0} for i in range(1, 13)]})
    empty = RankerSequence(np.zeros(6, np.int64), np.zeros(6, np.int64), np.zeros(6, np.float32))
    acted = RankerSequence(np.array([0, 0, 0, 4, 5, 6]), np.array([0, 0, 0, 1, 2, 1]), np.zeros(6, np.float32))
    a = rank(model, cands, np.arange(1, 13), 0, empty, k=12)
    b = rank(model, cands, np.arange(1, 13), 0, acted, k=12)
    assert [r["score"] for r in a] != pytest.approx([r["score"] for r in b])


def _events(rows) -> pd.DataFrame:
    """rows: (event_id, user, item, action, seconds after T0, request_id or None), all on homefeed."""
    df = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "action", "s", "request_id"])
    df["ts"] = T0 + pd.to_timedelta(df.pop("s"), unit="s")
    df["surface"], df["context_item_id"], df["query"] = "homefeed", None, None
    return conform(df, "events")


def test_serving_sequence_equals_training_sequence(tmp_path):
    """The training side (build_ranking_examples over the whole log) and the serving side (the source's actions
    before the cut as RecentEvents, the rest ingested into a real action store, merged as /retrieve does) give the
    same sequence for each request after the cut."""
    vocab = Vocab(item_ids=np.arange(1, 9, dtype=np.int64), user_ids=np.array([1, 2], dtype=np.int64),
                  categories=["c"], genres=[], demographic_fields=[], demographic_values=[])
    rows = [("e00", 1, 1, "click", 10, None), ("e01", 1, 2, "save", 20, None), ("e02", 2, 3, "click", 25, None),
            ("e03", 1, 99, "click", 30, None),  # an item the release does not know: not in the sequence
            ("e04", 1, 3, "impression", 40, "r1"), ("e05", 1, 4, "impression", 40, "r1"),  # impressions: neither
            ("e06", 1, 4, "hide", 41, "r1"), ("e07", 1, 5, "skip", 50, None),
            ("e08", 1, 6, "impression", 60, "r2"), ("e09", 1, 7, "impression", 60, "r2"),
            ("e10", 1, 6, "click", 61, "r2"), ("e11", 2, 7, "impression", 70, "r3"),
            ("e12", 1, 8, "conversion", 80, None), ("e13", 1, 1, "impression", 90, "r4")]
    events = _events(rows)
    S, days = 4, 365
    train = build_ranking_examples(events, vocab, S, days)
    cut = T0 + pd.Timedelta(seconds=35)  # the source holds what came before; the rest arrived live
    recent = RecentEvents(EventArrays.from_events(events[events["ts"] < cut]), cut.to_pydatetime())
    live = LiveEvents(SQLiteActionStore(tmp_path / "rt.sqlite"), None, max_skew_s=1e9)
    later = events[events["ts"] >= cut]
    live.ingest([{**r, "ts": r["ts"].isoformat(), "request_id": r["request_id"]}
                 for r in later.drop(columns=["context_item_id", "query"]).to_dict("records")])
    checked = 0
    for r in np.unique(train.request):
        row = int(np.flatnonzero(train.request == r)[0])
        if train.ts_us[row] < to_us(cut):
            continue
        user = int(train.user_id[row])
        actions = merge(recent.get([user]), live.actions(user))
        seq = ranker_sequence(actions, vocab, user, int(train.ts_us[row]), S, days)
        np.testing.assert_array_equal(seq.items, train.hist_items[row])
        np.testing.assert_array_equal(seq.actions, train.hist_actions[row])
        np.testing.assert_allclose(seq.age_s, train.hist_age_s[row])
        checked += 1
    assert checked == 6  # r1 (40 s), 50 s, r2, r3, 80 s, r4: a row without request_id is a request of its own
    # by hand, user 1 at r4 (90 s): the last 4 actions before it, impressions and item 99 left out
    row = int(np.flatnonzero(train.ts_us == to_us(T0 + pd.Timedelta(seconds=90)))[0])
    assert train.hist_items[row].tolist() == [4, 5, 6, 8]
    assert train.hist_age_s[row].tolist() == [49.0, 40.0, 29.0, 10.0]


def test_serving_scores_equal_the_training_side_predictions():
    """The evaluation's predictions (tasks/train_ranker.predict over build_ranking_examples, the batch path) and
    serving's (ranker_sequence + rank, the shared-sequence path) agree for every shown item of every request."""
    from towerflow.tasks.train_ranker import predict

    vocab = Vocab(item_ids=np.arange(1, 9, dtype=np.int64), user_ids=np.array([1, 2], dtype=np.int64),
                  categories=["c"], genres=[], demographic_fields=[], demographic_values=[])
    rows = [("e00", 1, 1, "click", 10, None), ("e01", 1, 2, "save", 20, None), ("e02", 2, 3, "click", 25, None),
            ("e04", 1, 3, "impression", 40, "r1"), ("e05", 1, 4, "impression", 40, "r1"),
            ("e06", 1, 4, "hide", 41, "r1"), ("e07", 1, 5, "skip", 50, None),
            ("e08", 1, 6, "impression", 60, "r2"), ("e09", 1, 7, "impression", 60, "r2"),
            ("e10", 1, 6, "click", 61, "r2"), ("e11", 2, 7, "impression", 70, "r3"),
            ("e12", 2, 8, "impression", 70, "r3"), ("e13", 1, 1, "impression", 90, "r4")]
    events = _events(rows)
    torch.manual_seed(3)
    cfg = RankerConfig(max_seq_len=4, latest_k=2, action_dim=2, item_dim=3, mlp_hidden=(8,), dropout=0.0)
    model = Ranker(torch.randn(9, 5), cfg).eval()
    ex = build_ranking_examples(events, vocab, 4, 365)
    expected = predict(model, ex)  # (n, H)
    actions = EventArrays.from_events(events)
    for r in np.unique(ex.request):
        idx = np.flatnonzero(ex.request == r)
        user, ts = int(ex.user_id[idx[0]]), int(ex.ts_us[idx[0]])
        seq = ranker_sequence(actions, vocab, user, ts, 4, 365)
        shown = merge_candidates({"shown": [{"item_id": int(vocab.item_ids[i - 1]), "score": 0.0}
                                            for i in ex.item[idx]]})
        got = {o["item_id"]: list(o["heads"].values())
               for o in rank(model, shown, vocab.item_index(shown.item_ids), int(ex.surface[idx[0]]), seq, k=len(idx))}
        for j in idx:
            np.testing.assert_allclose(got[int(vocab.item_ids[ex.item[j] - 1])], expected[j], atol=1e-6)
