"""Histories at a point in time (tasks/history.py): hand-worked values, and equality with the histories training sees."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from towerflow.serving.history import source_horizon
from towerflow.tasks.history import (
    EventArrays,
    HistoryFormatError,
    HistorySpec,
    build_histories,
    from_us,
    to_us,
)
from towerflow.tasks.vocabulary import Vocab

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = HistorySpec(max_seq_len=4, gap_buckets=16, max_history_days=365)


def _events(rows: list[tuple]) -> pd.DataFrame:
    """rows of (event_id, user_id, item_id, action, seconds after T0)."""
    return pd.DataFrame({
        "event_id": [r[0] for r in rows], "user_id": [r[1] for r in rows], "item_id": [r[2] for r in rows],
        "action": [r[3] for r in rows], "ts": [T0 + timedelta(seconds=r[4]) for r in rows],
        "surface": ["homefeed"] * len(rows), "context_item_id": [None] * len(rows), "query": [None] * len(rows),
    })


def _vocab(items: list[int]) -> Vocab:
    return Vocab(np.array(items), np.array([7, 8]), ["c"], [], [], [])


def test_last_actions_before_as_of_left_padded_with_gaps_from_the_latest_action_worked_by_hand():
    events = _events([
        ("e1", 7, 10, "click", 100),
        ("e2", 7, 20, "impression", 200),  # impressions are not history
        ("e3", 7, 30, "skip", 300),  # negative actions are
        ("e4", 7, 99, "save", 400),  # item 99 is not in the release's vocabulary: dropped
        ("e5", 7, 10, "click", 500),
        ("e6", 7, 20, "click", 600),  # at as_of: not strictly before, not seen
        ("e7", 8, 20, "impression", 50),  # user 8 has no history action: not in the result
    ])
    hist = build_histories(EventArrays.from_events(events), _vocab([10, 20, 30]), to_us(T0 + timedelta(seconds=600)),
                           SPEC)
    assert hist.user_id.tolist() == [7]
    # item indices: 10 -> 1, 30 -> 3; actions: click 2, skip 5 (0 = padding)
    assert hist.hist_items.tolist() == [[0, 1, 3, 1]]
    assert hist.hist_actions.tolist() == [[0, 2, 5, 2]]
    # gaps from the latest action (500 s), bucket 1 + floor(log2(1 + s) / 2):
    # 400 s -> 1 + floor(8.65 / 2) = 5, 200 s -> 1 + floor(7.65 / 2) = 4, 0 s -> 1
    assert hist.hist_gaps.tolist() == [[0, 5, 4, 1]]
    assert from_us(hist.last_event_us[0]) == T0 + timedelta(seconds=500)
    assert hist.seen[0].tolist() == [10, 30]  # distinct, most recent first


def test_keeps_only_the_latest_L_and_caps_seen():
    events = _events([(f"e{i}", 7, 10 + i % 5, "click", i) for i in range(12)])
    hist = build_histories(EventArrays.from_events(events), _vocab([10, 11, 12, 13, 14]), to_us(T0 + timedelta(1)),
                           HistorySpec(3, 16, 365), max_seen=2)
    # the last three clicks are at 9, 10, 11 s: items 14, 10, 11 -> indices 5, 1, 2
    assert hist.hist_items.tolist() == [[5, 1, 2]]
    assert hist.seen[0].tolist() == [11, 10]


def test_same_timestamp_ties_follow_event_id_whatever_the_row_order():
    rows = [("b", 7, 20, "click", 10), ("a", 7, 10, "click", 10)]
    as_of = to_us(T0 + timedelta(seconds=20))
    fwd = build_histories(EventArrays.from_events(_events(rows)), _vocab([10, 20]), as_of, HistorySpec(2, 16, 365))
    rev = build_histories(EventArrays.from_events(_events(rows[::-1])), _vocab([10, 20]), as_of, HistorySpec(2, 16, 365))
    assert fwd.hist_items.tolist() == rev.hist_items.tolist() == [[1, 2]]  # "a" (item 10) first


def test_empty_and_unknown_action():
    hist = build_histories(EventArrays.empty(), _vocab([10]), to_us(T0), SPEC)
    assert len(hist) == 0 and hist.hist_items.shape == (0, 4) and hist.seen == []
    with pytest.raises(Exception, match="like"):
        EventArrays.from_events(_events([("e", 7, 10, "like", 0)]))


def test_source_horizon_is_the_end_of_the_last_day_unless_that_is_in_the_future():
    from datetime import date

    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert source_horizon([date(2026, 1, 3), date(2026, 1, 4)], now) == datetime(2026, 1, 5, tzinfo=UTC)
    assert source_horizon([date(2026, 3, 1)], now) == now
    assert source_horizon([], now) == now


def test_histories_equal_those_build_examples_gives_the_holdout(tmp_path):
    """For every holdout example, the history at its target's time is exactly the example's history."""
    from towerflow.config import ExamplesConfig, WorldConfig
    from towerflow.data.source import ParquetSource
    from towerflow.data.synthetic import generate_world
    from towerflow.tasks.build_examples import build_examples

    generate_world(str(tmp_path), WorldConfig(n_users=60, n_items=80, n_topics=4, days=3, events_per_day=800,
                                              new_items_per_day=3, seed=4))
    src = ParquetSource(str(tmp_path))
    end = datetime(2026, 1, 4, tzinfo=UTC)
    events = src.read_events(end - timedelta(days=3), end).sort_values(["ts", "event_id"], ignore_index=True)
    cfg = ExamplesConfig(max_seq_len=6, split="time", max_history_days=2)  # 2 days: the age bound matters
    ex = build_examples(events, src.read_users(), src.read_items(), end, cfg)
    ho = ex.holdout
    assert len(ho) > 20 and (ho.history_length() > 0).sum() > 20

    arrays = EventArrays.from_events(events)
    ts_us = pd.DatetimeIndex(events["ts"]).as_unit("us").asi8
    positive = events["action"].isin(["click", "save", "conversion"]).to_numpy()
    boundary = to_us(end - timedelta(days=cfg.holdout_days))
    for r in range(len(ho)):
        user = int(ex.vocab.user_ids[ho.user_idx[r] - 1])
        # the holdout target is the user's first positive in the holdout day
        t = ts_us[positive & (events["user_id"].to_numpy() == user) & (ts_us >= boundary)].min()
        hist = build_histories(arrays.take(arrays.user_id == user), ex.vocab, int(t), HistorySpec.from_config(cfg))
        if ho.history_length()[r] == 0:
            assert len(hist) == 0
            continue
        assert hist.user_id.tolist() == [user]
        np.testing.assert_array_equal(hist.hist_items[0], ho.hist_items[r])
        np.testing.assert_array_equal(hist.hist_actions[0], ho.hist_actions[r])
        np.testing.assert_array_equal(hist.hist_gaps[0], ho.hist_gaps[r])
        # exclude_seen drops what evaluation excludes: every item acted on before the target
        seen_idx = ex.vocab.item_index(hist.seen[0])
        assert sorted(seen_idx.tolist()) == sorted(ex.holdout_seen.row(r).tolist())


def test_a_user_back_after_weeks_gets_the_tokens_they_left_with_until_actions_pass_the_max_age():
    events = _events([("e1", 7, 10, "click", 0), ("e2", 7, 20, "save", 3600), ("e3", 8, 10, "click", 86_400 * 10)])
    arrays, vocab = EventArrays.from_events(events), _vocab([10, 20])
    spec = HistorySpec(max_seq_len=3, gap_buckets=16, max_history_days=30)
    soon = build_histories(arrays, vocab, to_us(T0 + timedelta(days=11)), spec)
    later = build_histories(arrays, vocab, to_us(T0 + timedelta(days=30)), spec)  # 4 weeks away: same tokens
    for name in ("user_id", "hist_items", "hist_actions", "hist_gaps"):
        np.testing.assert_array_equal(getattr(soon, name), getattr(later, name))
    # user 7: 3600 s before the latest action -> 1 + floor(log2(3601) / 2) = 1 + floor(11.81 / 2) = 6
    assert later.hist_gaps[0].tolist() == [0, 6, 1]
    # at day 30 + 1 s, e1 (day 0) is older than 30 days: it leaves the history, and its item the seen set
    cut = build_histories(arrays, vocab, to_us(T0 + timedelta(days=30, seconds=1)), spec)
    assert cut.hist_items[0].tolist() == [0, 0, 2] and cut.seen[0].tolist() == [20]
    # at day 39, user 7's actions are all older than 30 days: no history; user 8's one action (day 10) is in
    gone = build_histories(arrays, vocab, to_us(T0 + timedelta(days=39)), spec)
    assert gone.user_id.tolist() == [8]


def test_a_release_without_a_history_spec_is_refused_by_name():
    old = {"examples": {"max_seq_len": 16, "gap_buckets": 16, "split": "time"}}
    with pytest.raises(HistoryFormatError, match="r-old .*retrain"):
        HistorySpec.from_release_config("r-old", old)
    new = {"examples": {**old["examples"], "gap_reference": "latest_action", "max_history_days": 90}}
    assert HistorySpec.from_release_config("r-new", new) == HistorySpec(16, 16, 90)
