"""The synthetic world: deterministic, on contract, and with the planted structure measurable in its output."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from towerflow.cli import main
from towerflow.config import WorldConfig
from towerflow.contract import ACTIONS, NEGATIVE_ACTIONS, POSITIVE_ACTIONS, SURFACES
from towerflow.data.source import ParquetSource
from towerflow.data.synthetic import WorldSummary, generate_world, planted_interests
from towerflow.errors import TowerflowError

ALL_TIME = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
SMALL = WorldConfig(n_users=300, n_items=400, n_topics=10, days=4, events_per_day=3_000, new_items_per_day=20,
                    drift_per_day=0.0, seed=3)


def _read(path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    src = ParquetSource(str(path))
    return src.read_events(*ALL_TIME), src.read_users(), src.read_items()


def _topics(items: pd.DataFrame) -> pd.Series:
    """item_id -> topic index, parsed from the category name ``topic_07``."""
    return items.set_index("item_id").category.str.removeprefix("topic_").astype(int)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "source"
    summary = generate_world(str(path), SMALL)
    events, users, items = _read(path)
    return summary, events, users, items


def test_same_config_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    cfg = SMALL.model_copy(update={"days": 2, "events_per_day": 500})
    prints = []
    for name, c in (("a", cfg), ("b", cfg), ("c", cfg.model_copy(update={"seed": 4}))):
        generate_world(str(tmp_path / name), c)
        prints.append(ParquetSource(str(tmp_path / name)).fingerprint(*ALL_TIME))
    assert prints[0] == prints[1]
    assert prints[0] != prints[2]


def test_summary_counts_what_was_written(world):
    summary, events, users, items = world
    assert isinstance(summary, WorldSummary)
    assert summary.events == len(events) == 4 * 3_000
    assert summary.users == len(users) == 300
    assert summary.items == len(items) == 400 + 4 * 20
    assert summary.actions == events.action.value_counts().reindex(ACTIONS, fill_value=0).to_dict()
    assert summary.surfaces == events.surface.value_counts().reindex(SURFACES, fill_value=0).to_dict()
    text = str(summary)
    assert "12,000" in text and "2026-01-01 .. 2026-01-04" in text and str(summary.path) in text


def test_output_follows_the_contract(world):
    _, events, users, items = world
    src = ParquetSource(world[0].path)
    assert src.days() == [date(2026, 1, 1) + timedelta(days=i) for i in range(4)]
    for d in src.days():  # every partition holds exactly its own day
        day_events = src.read_events(datetime(d.year, d.month, d.day, tzinfo=UTC),
                                     datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(days=1))
        assert len(day_events) == 3_000
        assert day_events.event_id.str.startswith(d.isoformat()).all()
    assert events.event_id.is_unique
    assert set(events.action) == set(ACTIONS)
    assert set(events.surface) == set(SURFACES)
    assert events.user_id.isin(users.user_id).all()
    assert events.item_id.isin(items.item_id).all()
    related = events.surface == "related"
    assert events.context_item_id[related].notna().all() and events.context_item_id[~related].isna().all()
    assert events.context_item_id[related].astype(int).isin(items.item_id).all()
    search = events.surface == "search"
    assert events["query"][search].notna().all() and events["query"][~search].isna().all()
    created = items.set_index("item_id").created_ts
    assert (events.ts.to_numpy() >= created.loc[events.item_id].to_numpy()).all()  # no event before its item
    assert (users.signup_ts < events.ts.min()).all()
    assert {"country", "age_bucket", "gender"} <= set(users.columns)
    assert items.category.str.fullmatch(r"topic_\d\d").all() and items.category.nunique() == 10
    assert items.genres.str.split("|").map(len).between(1, 2).all()
    assert items.features.map(len).eq(8).all()
    assert 0.2 <= events.action.isin(POSITIVE_ACTIONS).mean() <= 0.4


def test_related_context_predicts_the_engaged_items_topic_and_neighbourhood(world):
    _, events, _, items = world
    topic = _topics(items)
    rel = events[(events.surface == "related") & events.action.isin(POSITIVE_ACTIONS)]
    ctx = rel.context_item_id.astype(int)
    same_topic = topic.loc[rel.item_id].to_numpy() == topic.loc[ctx].to_numpy()
    assert same_topic.mean() > 0.6  # chance is 1 / n_topics = 0.1
    # Inside the topic, engaged items sit next to the viewed one: they share its sub-genre far more often
    # than two random items of one topic do (about 0.4 with 4 sub-genres, some items having two).
    genres = items.set_index("item_id").genres.str.split("|").map(set)
    shares = np.array([bool(a & b) for a, b in zip(genres.loc[rel.item_id], genres.loc[ctx], strict=True)])
    rng = np.random.default_rng(0)
    a, b = rng.choice(items.item_id, 5_000), rng.choice(items.item_id, 5_000)
    pairs = (topic.loc[a].to_numpy() == topic.loc[b].to_numpy()) & (a != b)
    random_share = np.mean([bool(x & y) for x, y in zip(genres.loc[a[pairs]], genres.loc[b[pairs]], strict=True)])
    assert shares[same_topic].mean() > random_share + 0.3


def test_some_related_contexts_are_not_in_the_users_history(world):
    """Sessions entered from outside view an item the user never touched: only the context can explain them."""
    _, events, _, _ = world
    ev = events.sort_values("ts", kind="stable")
    first_touch = ev.drop_duplicates(["user_id", "item_id"]).set_index(["user_id", "item_id"]).ts
    rel = ev[(ev.surface == "related") & ev.action.isin(POSITIVE_ACTIONS)]
    keys = pd.MultiIndex.from_arrays([rel.user_id, rel.context_item_id.astype(int)])
    touched = first_touch.reindex(keys).to_numpy()
    unseen = pd.isna(touched) | (touched >= rel.ts.to_numpy())
    assert unseen.mean() > 0.1


def test_popularity_is_skewed(world):
    _, events, _, items = world
    counts = events.item_id.value_counts()
    top_decile = counts.iloc[: len(items) // 10].sum() / len(events)
    assert top_decile > 0.3  # a uniform catalog would give about 0.1


def test_new_items_arrive_every_day_and_get_engaged(world):
    _, events, _, items = world
    start = pd.Timestamp("2026-01-01", tz="UTC")
    new = items[items.created_ts >= start]
    per_day = new.created_ts.dt.date.value_counts()
    assert len(new) == 80 and per_day.eq(20).all() and len(per_day) == 4
    engaged = events[events.item_id.isin(new.item_id) & events.action.isin(POSITIVE_ACTIONS)]
    # Each day some of that day's new items are already engaged with.
    same_day = engaged.ts.dt.date == new.set_index("item_id").created_ts.dt.date.loc[engaged.item_id].to_numpy()
    assert set(engaged[same_day.to_numpy()].ts.dt.date) == set(per_day.index)
    assert new.item_id.isin(events.item_id).mean() > 0.8


def test_fresh_items_are_engaged_more_than_old_ones(world):
    """What a model retrained on recent days can know and a stale one cannot: the newest items are hot."""
    _, events, _, items = world
    last = events[events.ts >= pd.Timestamp("2026-01-04", tz="UTC")]
    fresh = items.created_ts >= pd.Timestamp("2026-01-02", tz="UTC")  # created in the last three days
    per_item = last.item_id.value_counts().reindex(items.item_id, fill_value=0).to_numpy()
    assert per_item[fresh.to_numpy()].mean() > 1.8 * per_item[~fresh.to_numpy()].mean()


def test_negative_actions_fall_mostly_outside_the_users_interests(world):
    _, events, _, items = world
    interests = planted_interests(SMALL)  # drift_per_day=0: the first day's interests hold throughout
    assert interests.shape == (300, 3)
    topic = _topics(items).loc[events.item_id].to_numpy()
    inside = (interests[events.user_id.to_numpy() - 1] == topic[:, None]).any(axis=1)
    negative, positive = events.action.isin(NEGATIVE_ACTIONS).to_numpy(), events.action.isin(POSITIVE_ACTIONS).to_numpy()
    assert inside[negative].mean() < 0.5
    assert inside[positive].mean() > 0.8


def _topic_shift(path) -> float:
    """Mean total-variation distance between each user's homefeed positive topics on the first and last day."""
    events, _, items = _read(path)
    topic = _topics(items)
    ev = events[(events.surface == "homefeed") & events.action.isin(POSITIVE_ACTIONS)]
    ev = ev.assign(topic=topic.loc[ev.item_id].to_numpy(), day=ev.ts.dt.date)
    days = sorted(ev.day.unique())
    dist = [pd.crosstab(ev.user_id[ev.day == d], ev.topic[ev.day == d]).reindex(columns=range(10), fill_value=0)
            for d in (days[0], days[-1])]
    users = dist[0].index.intersection(dist[1].index)
    first, last = (d.loc[users].div(d.loc[users].sum(axis=1), axis=0) for d in dist)
    return float(0.5 * (first - last).abs().sum(axis=1).mean())


def test_interest_drift_moves_topic_mix_beyond_sampling_noise(tmp_path):
    """Same seed with and without drift: the first day is identical, the last day's topic mix moves further."""
    cfg = SMALL.model_copy(update={"n_users": 60})
    generate_world(str(tmp_path / "still"), cfg)
    generate_world(str(tmp_path / "drift"), cfg.model_copy(update={"drift_per_day": 0.5}))
    noise, drifted = _topic_shift(tmp_path / "still"), _topic_shift(tmp_path / "drift")
    assert drifted > noise + 0.1


def test_bad_configs_and_foreign_sources_are_refused(tmp_path):
    with pytest.raises(TowerflowError, match=r"n_items \(15\) must be at least 2 x n_topics \(10\)"):
        generate_world(str(tmp_path / "a"), WorldConfig(n_items=15, n_topics=10))
    with pytest.raises(TowerflowError, match=r"interests_per_user \(3\) must be below n_topics \(3\)"):
        generate_world(str(tmp_path / "b"), WorldConfig(n_topics=3, n_items=100))
    foreign = tmp_path / "imported"
    (foreign / "events" / "dt=2026-01-01").mkdir(parents=True)
    with pytest.raises(TowerflowError, match="not a generated world"):
        generate_world(str(foreign), SMALL)


def test_regenerating_replaces_the_previous_world(tmp_path):
    out = str(tmp_path / "src")
    generate_world(out, SMALL.model_copy(update={"days": 3, "events_per_day": 200}))
    generate_world(out, SMALL.model_copy(update={"days": 1, "events_per_day": 200}))
    assert ParquetSource(out).days() == [date(2026, 1, 1)]


def test_cli_generate_end_to_end(tmp_path, data_root, capsys):
    out = tmp_path / "cli"
    rc = main(["data", "generate", "--days", "2", "--events-per-day", "1000", "--users", "100", "--items", "200",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert f"synthetic world -> {out}" in printed.out and "2,000" in printed.out
    assert "days 2/2" in printed.err
    assert len(ParquetSource(str(out)).read_events(*ALL_TIME)) == 2_000
