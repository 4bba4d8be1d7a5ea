"""The synthetic world's slates: requests grouped by request_id, and a short-term signal in them."""

from __future__ import annotations

import pandas as pd

from towerflow.config import WorldConfig
from towerflow.contract import POSITIVE_ACTIONS
from towerflow.data.synthetic import generate_world


def test_slates_are_requests_with_a_session_signal(tmp_path):
    cfg = WorldConfig(n_users=60, n_items=200, n_topics=8, days=2, events_per_day=400, slate_size=4, seed=3)
    generate_world(str(tmp_path / "w"), cfg)
    ev = pd.read_parquet(tmp_path / "w" / "events").sort_values(["ts", "event_id"])
    items = pd.read_parquet(tmp_path / "w" / "items.parquet").set_index("item_id")
    g = ev.groupby("request_id")
    assert (g.size() == 4).all() and len(g) == 2 * 400
    assert (g["user_id"].nunique() == 1).all() and (g["ts"].nunique() == 1).all()
    assert (g["surface"].nunique() == 1).all()

    # Within a session, items of the topic of the user's previous positive are engaged far more than others.
    ev["topic"] = items.loc[ev["item_id"], "category"].to_numpy()
    ev["positive"] = ev["action"].isin(POSITIVE_ACTIONS)
    req = g.agg(user=("user_id", "first"), ts=("ts", "first")).sort_values("ts")
    last_topic: dict[int, str] = {}
    prev: dict[str, str | None] = {}
    for rid, row in req.iterrows():
        prev[rid] = last_topic.get(row["user"])
        pos = ev[(ev["request_id"] == rid) & ev["positive"]]
        if len(pos):
            last_topic[row["user"]] = pos["topic"].iloc[0]
    same = ev["topic"].to_numpy() == ev["request_id"].map(prev).to_numpy()
    rate_same, rate_other = ev["positive"][same].mean(), ev["positive"][~same].mean()
    assert rate_same > 1.5 * rate_other, (rate_same, rate_other)


def test_single_item_worlds_have_no_request_id(tmp_path):
    generate_world(str(tmp_path / "w"), WorldConfig(n_users=20, n_items=40, n_topics=4, days=1, events_per_day=50))
    assert "request_id" not in pd.read_parquet(tmp_path / "w" / "events").columns
