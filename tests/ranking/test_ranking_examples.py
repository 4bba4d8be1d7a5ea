"""Ranking examples against a slow reference (a plain loop over events), and by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from towerflow.config import RANKER_HEADS
from towerflow.contract import ACTIONS, SURFACES, ContractError, arrow_schema, conform
from towerflow.tasks.history import ACTION_INDEX
from towerflow.tasks.ranking_examples import build_ranking_examples, split_by_time, user_profiles
from towerflow.tasks.vocabulary import Vocab

T0 = pd.Timestamp("2026-01-05", tz="UTC")
DAY_US = 86_400_000_000


def _vocab(item_ids) -> Vocab:
    return Vocab(item_ids=np.array(sorted(item_ids), dtype=np.int64), user_ids=np.arange(1, 10, dtype=np.int64),
                 categories=["c"], genres=[], demographic_fields=[], demographic_values=[])


def _events(rows) -> pd.DataFrame:
    """rows: (event_id, user, item, action, seconds after T0, surface, request_id or None)."""
    df = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "action", "s", "surface", "request_id"])
    df["ts"] = T0 + pd.to_timedelta(df.pop("s"), unit="s")
    df["context_item_id"], df["query"] = None, None
    return conform(df, "events")


def _random_log(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows, n = [], 0
    for r in range(40):
        user, t = int(rng.integers(1, 5)), int(rng.integers(0, 12)) * 60  # few distinct times: many ties
        if rng.random() < 0.1:
            t -= 400 * 86_400  # older than max_history_days for late requests
        surface = str(rng.choice(SURFACES))
        rid = None if rng.random() < 0.3 else f"q{r}"
        for _ in range(int(rng.integers(1, 5))):
            item = int(rng.integers(1, 10))  # item 9 is unknown to the vocabulary
            rows.append((f"e{n}", user, item, str(rng.choice(ACTIONS)), t + int(rng.integers(0, 2)) * (rid is not None),
                         surface, rid))
            n += 1
    return _events(rows)


def _reference(events: pd.DataFrame, known: set[int], S: int, max_days: int):
    """Plain loop: one dict per example, requests in time order (ties: first appearance), items ascending."""
    ev = events.reset_index(drop=True)
    ts = {i: int(pd.Timestamp(t).value // 1000) for i, t in enumerate(ev["ts"])}
    requests: dict[object, list[int]] = {}
    for i, row in ev.iterrows():
        key = row["request_id"] if not pd.isna(row["request_id"]) else (row["user_id"], ts[i], row["surface"])
        requests.setdefault(key, []).append(i)
    out = []
    for order, idx in enumerate(requests.values()):
        first = min(idx, key=lambda i: (ts[i], i))
        t_req, user = ts[first], int(ev.at[first, "user_id"])
        hist = [i for i in range(len(ev)) if ev.at[i, "user_id"] == user and ev.at[i, "action"] != "impression"
                and int(ev.at[i, "item_id"]) in known and ts[i] < t_req and ts[i] >= t_req - max_days * DAY_US]
        hist = sorted(hist, key=lambda i: (ts[i], ev.at[i, "event_id"]))[-S:]
        pad = S - len(hist)
        for item in sorted({int(ev.at[i, "item_id"]) for i in idx} & known):
            acts = {ev.at[i, "action"] for i in idx if int(ev.at[i, "item_id"]) == item}
            out.append({
                "sort": (t_req, order, item), "user": user, "ts": t_req, "item": item,
                "surface": SURFACES.index(ev.at[first, "surface"]),
                "labels": [float(h in acts) for h in RANKER_HEADS],
                "items": [0] * pad + [int(ev.at[i, "item_id"]) for i in hist],
                "actions": [0] * pad + [ACTION_INDEX[ev.at[i, "action"]] for i in hist],
                "age": [0.0] * pad + [(t_req - ts[i]) / 1e6 for i in hist],
            })
    return sorted(out, key=lambda d: d["sort"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_examples_match_the_slow_reference(seed):
    events = _random_log(seed)
    known = set(range(1, 9))
    vocab = _vocab(known)  # item id == item index here (ids 1..8)
    ex = build_ranking_examples(events, vocab, max_seq_len=6, max_history_days=365)
    ref = _reference(events, known, 6, 365)
    assert len(ex) == len(ref) > 20
    assert ex.user_id.tolist() == [d["user"] for d in ref]
    assert ex.ts_us.tolist() == [d["ts"] for d in ref]
    assert ex.item.tolist() == [d["item"] for d in ref]
    assert ex.surface.tolist() == [d["surface"] for d in ref]
    assert ex.labels.tolist() == [d["labels"] for d in ref]
    assert ex.hist_items.tolist() == [d["items"] for d in ref]
    assert ex.hist_actions.tolist() == [d["actions"] for d in ref]
    np.testing.assert_allclose(ex.hist_age_s, [d["age"] for d in ref])
    assert (np.diff(ex.request) >= 0).all() and (np.diff(ex.ts_us) >= 0).all()


def test_a_slate_by_hand():
    events = _events([
        ("a", 1, 5, "click", 0, "homefeed", None),  # history
        ("b", 1, 6, "impression", 10, "homefeed", None),  # impressions never enter the sequence
        ("c", 1, 7, "hide", 10, "homefeed", None),  # same time as the request below: excluded (strictly before)
        ("d", 1, 1, "impression", 10, "related", "R"),  # the slate R at t = 10 s
        ("e", 1, 2, "impression", 10, "related", "R"),
        ("f", 1, 2, "click", 15, "related", "R"),  # a later click on a shown item belongs to R
        ("g", 1, 2, "save", 20, "related", "R"),
        ("h", 1, 3, "hide", 10, "related", "R"),
    ])
    ex = build_ranking_examples(events, _vocab(range(1, 9)), max_seq_len=3, start_us=T0.value // 1000 + 1)
    r = ex.take(ex.item >= 1)
    # requests from t > 0: (1, 10 s, homefeed) showing 6 and 7, and R showing 1, 2, 3; R first in the log order
    assert [(int(i), list(lab)) for i, lab in zip(r.item, r.labels, strict=True)] == [
        (6, [0, 0, 0, 0, 0]), (7, [0, 0, 0, 0, 1]),
        (1, [0, 0, 0, 0, 0]), (2, [1, 1, 0, 0, 0]), (3, [0, 0, 0, 0, 1])]
    assert ex.request.tolist() == [0, 0, 1, 1, 1]
    assert ex.surface.tolist() == [0, 0, 1, 1, 1]
    assert ex.hist_items.tolist() == [[0, 0, 5]] * 5
    assert ex.hist_actions.tolist() == [[0, 0, ACTION_INDEX["click"]]] * 5
    assert ex.hist_age_s.tolist() == [[0, 0, 10.0]] * 5


def test_a_request_id_of_two_users_is_refused():
    events = _events([("a", 1, 1, "click", 0, "homefeed", "R"), ("b", 2, 2, "click", 0, "homefeed", "R")])
    with pytest.raises(ContractError, match="request 'R' holds events of more than one user"):
        build_ranking_examples(events, _vocab(range(1, 9)), max_seq_len=3)


def test_profiles_and_time_split():
    events = _events([
        ("a", 1, 1, "click", 0, "homefeed", None), ("b", 1, 2, "save", 5, "homefeed", None),
        ("c", 1, 3, "hide", 6, "homefeed", None), ("d", 1, 4, "click", 9, "homefeed", None),
    ])
    vectors = np.arange(18, dtype=np.float32).reshape(9, 2)  # item i -> (2i, 2i + 1)
    t = T0.value // 1000
    prof = user_profiles(events, _vocab(range(1, 9)), vectors, np.array([1, 1, 2]),
                         np.array([t + 9_000_000, t, t + 99_000_000]))
    # before 9 s: clicks/saves on items 1 and 2 (the hide is not positive) -> mean of (2, 3) and (4, 5)
    assert prof.tolist() == [[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]
    ex = build_ranking_examples(events, _vocab(range(1, 9)), max_seq_len=2)
    early, late = split_by_time(ex, 0.25)
    assert early.request.tolist() == [0, 1, 2] and late.request.tolist() == [3]


def test_request_id_is_an_optional_contract_column():
    base = _events([("a", 1, 1, "click", 0, "homefeed", None)])
    without = conform(base.drop(columns="request_id"), "events")
    assert "request_id" not in without.columns and "request_id" not in arrow_schema(without, "events").names
    with_ints = conform(base.assign(request_id=[7]), "events")
    assert with_ints["request_id"].tolist() == ["7"]
    assert str(arrow_schema(with_ints, "events").field("request_id").type) == "string"
    ex = build_ranking_examples(without, _vocab(range(1, 9)), max_seq_len=2)
    assert ex.item.tolist() == [1] and ex.labels.tolist() == [[1, 0, 0, 0, 0]]


def test_impressions_only_and_an_empty_log():
    events = _events([("a", 1, 1, "impression", 0, "homefeed", "R"), ("b", 1, 2, "impression", 0, "homefeed", "R")])
    ex = build_ranking_examples(events, _vocab(range(1, 9)), max_seq_len=3)
    assert ex.item.tolist() == [1, 2] and not ex.labels.any() and not ex.hist_actions.any()
    empty = build_ranking_examples(events.iloc[:0], _vocab(range(1, 9)), max_seq_len=3)
    assert len(empty) == 0 and empty.hist_items.shape == (0, 3)
