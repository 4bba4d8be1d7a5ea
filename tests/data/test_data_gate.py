"""The data gate on real Great Expectations: every bad input fails its own named check with the right counts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from towerflow.config import GateConfig
from towerflow.contract import conform
from towerflow.validation.data import SnapshotStats, validate_snapshot
from towerflow.validation.result import GateFailed

START, END, NOW = "2026-01-01", "2026-01-03", "2026-01-04"  # a two-day window, validated the day after
# 20 events: 4 click + 2 save + 1 conversion = 7 positives -> positive rate 0.35
ACTIONS = ["impression"] * 10 + ["click"] * 4 + ["save"] * 2 + ["conversion"] + ["skip"] * 2 + ["hide"]
SURFACES = ["homefeed", "related", "search", "homefeed"] * 5


def _events() -> pd.DataFrame:
    n = 20
    return conform(
        pd.DataFrame(
            {
                "event_id": [f"e{i}" for i in range(n)],
                "user_id": [1 + i % 3 for i in range(n)],
                "item_id": [10 + i % 4 for i in range(n)],
                "action": ACTIONS,
                "ts": pd.Timestamp(START, tz="UTC") + pd.to_timedelta([2 * i for i in range(n)], unit="h"),
                "surface": SURFACES,
                "context_item_id": [10 if s == "related" else None for s in SURFACES],
                "query": ["shoes" if s == "search" else None for s in SURFACES],
            }
        ),
        "events",
    )


def _users() -> pd.DataFrame:
    return conform(
        pd.DataFrame({"user_id": [1, 2, 3], "signup_ts": ["2025-06-01"] * 3, "country": ["us", "de", "fr"]}), "users"
    )


def _items() -> pd.DataFrame:
    return conform(
        pd.DataFrame(
            {
                "item_id": [10, 11, 12, 13],
                "category": ["shoes", "shoes", "hats", "bags"],
                "genres": [None, "a|b", None, "c"],
                "title": ["t10", "t11", "t12", "t13"],
                "created_ts": ["2025-01-01"] * 4,
            }
        ),
        "items",
    )


def _gate(events=None, users=None, items=None, previous=None, now=NOW, config=None):
    events = _events() if events is None else events
    users = _users() if users is None else users
    items = _items() if items is None else items
    return validate_snapshot(events, users, items, START, END, previous, config or GateConfig(), now=now)


def _failed(result) -> set[str]:
    return {c.name for c in result.failed_checks}


def test_clean_snapshot_passes_and_reports_stats():
    result = _gate()
    assert result.passed, result.summary()
    assert result.stats == SnapshotStats(row_count=20, positive_rate=0.35, window_days=2.0)
    assert result.check("events.positive rate").observed == pytest.approx(0.35)
    assert result.check("events.row count").observed == 20
    assert set(result.gx_results) == {"events", "users", "items"}
    assert all(r["success"] for r in result.gx_results.values())
    json.dumps(result.gx_results)  # the MLflow artifact must be plain JSON
    json.dumps(result.to_dict())
    result.raise_if_failed()


def test_null_keys_fail_with_row_numbers():
    ev = _events()
    ev["user_id"] = ev["user_id"].astype("Int64")  # nullable ints keep the contract type; only nulls are wrong
    ev.loc[[3, 8], "user_id"] = pd.NA
    ev.loc[5, "event_id"] = None
    result = _gate(ev)
    assert _failed(result) == {"events.user_id not null", "events.event_id not null"}
    user_nulls = result.check("events.user_id not null")
    assert user_nulls.observed == 2
    assert user_nulls.detail == "2 of 20 rows null (rows [3, 8])"
    assert result.check("events.event_id not null").observed == 1


def test_unknown_actions_name_the_values():
    ev = _events()
    ev.loc[[0, 1], "action"] = "like"
    ev.loc[2, "action"] = "share"
    result = _gate(ev)
    assert _failed(result) == {"events.action in ACTIONS"}
    check = result.check("events.action in ACTIONS")
    assert check.observed == 3
    assert check.examples == ["like", "share"]  # most frequent first
    with pytest.raises(GateFailed, match=r"events.action in ACTIONS: 3 of 20 rows not in .*e.g. \['like', 'share'\]"):
        result.raise_if_failed()


def test_timestamps_in_the_future_fail():
    ev = _events()
    ev.loc[[18, 19], "ts"] = pd.Timestamp("2026-01-02T18:00", tz="UTC")  # inside the window, after "now"
    result = _gate(ev, now="2026-01-02T12:00")
    assert _failed(result) == {"events.ts not in future"}
    check = result.check("events.ts not in future")
    assert check.observed == 2
    assert check.examples == ["2026-01-02T18:00:00+00:00"]


def test_timestamps_outside_the_window_fail():
    ev = _events()
    ev.loc[0, "ts"] = pd.Timestamp("2025-12-31T23:00", tz="UTC")
    ev.loc[1, "ts"] = pd.Timestamp(END, tz="UTC")  # the window is half-open: its end is outside
    result = _gate(ev)
    assert _failed(result) == {"events.ts inside window"}
    assert result.check("events.ts inside window").observed == 2


def test_duplicate_event_ids_fail():
    ev = _events()
    ev.loc[5, "event_id"] = "e4"
    result = _gate(ev)
    assert _failed(result) == {"events.event_id unique"}
    check = result.check("events.event_id unique")
    assert check.observed == 2  # both rows of the duplicated pair
    assert check.examples == ["e4"]


def test_events_for_unknown_users_and_items_fail():
    ev = _events()
    ev.loc[[0, 4], "item_id"] = 999
    ev.loc[6, "user_id"] = 77
    ev.loc[1, "context_item_id"] = 555  # row 1 is on `related`
    result = _gate(ev)
    assert _failed(result) == {"events.item_id in items", "events.user_id in users", "events.context_item_id in items"}
    assert result.check("events.item_id in items").observed == 2
    assert result.check("events.item_id in items").examples == [999]
    assert result.check("events.user_id in users").examples == [77]
    assert result.check("events.context_item_id in items").observed == 1


def test_missing_column_is_a_failing_check_not_a_crash():
    result = _gate(_events().drop(columns="surface"))
    assert _failed(result) == {"events.columns"}
    check = result.check("events.columns")
    assert check.observed == ["surface"]
    assert check.detail == "missing ['surface']"
    assert "events.surface in SURFACES" not in {c.name for c in result.checks}


@pytest.mark.parametrize(
    ("column", "bad", "observed", "skipped"),
    [
        ("user_id", lambda s: s.astype(str), "str", "events.user_id in users"),
        ("ts", lambda s: s.dt.tz_localize(None), "datetime64", "events.ts inside window"),
    ],
)
def test_wrong_dtype_fails_its_type_check(column, bad, observed, skipped):
    ev = _events()
    ev[column] = bad(ev[column])
    result = _gate(ev)
    assert _failed(result) == {f"events.{column} type"}
    check = result.check(f"events.{column} type")
    assert (check.observed, check.threshold) == (observed, "int64" if column == "user_id" else "Timestamp")
    assert skipped not in {c.name for c in result.checks}  # value checks on an unusable column are left out


def test_empty_window_fails():
    result = _gate(_events().iloc[:0])
    assert _failed(result) == {"events.row count", "events.every day has events", "events.last day has events"}
    assert result.check("events.row count").observed == 0
    assert result.check("events.row count").detail.startswith("empty window")
    assert result.stats.row_count == 0


@pytest.mark.parametrize(
    ("prev_rows", "prev_days", "passes", "bounds"),
    [
        (200, 2.0, False, "[21, 1999]"),  # 100/day -> 10/day: a 10x drop fails
        (180, 2.0, True, "[19, 1799]"),  # 90/day -> 10/day: a 9x drop passes
        (10, 1.0, True, "[3, 199]"),  # same 10/day over a shorter previous window: compared per day
        (1, 1.0, False, "[1, 19]"),  # 1/day -> 10/day: a 10x jump (double ingestion?) fails
    ],
)
def test_volume_is_bounded_per_day_by_the_previous_snapshot(prev_rows, prev_days, passes, bounds):
    result = _gate(previous=SnapshotStats(prev_rows, 0.35, prev_days))
    check = result.check("events.row count")
    assert (check.passed, check.threshold) == (passes, bounds)
    assert result.passed == passes


def test_positive_rate_jump_against_previous_fails():
    # previous 0.8 allows [0.4, 0.99] with the 2x default ratio; 0.35 is below
    result = _gate(previous=SnapshotStats(20, 0.8, 2.0))
    assert _failed(result) == {"events.positive rate"}
    assert result.check("events.positive rate").threshold == "[0.4, 0.99]"


def _all_clicks() -> pd.DataFrame:
    return _events().assign(action="click")  # 20 of 20 positive: rate 1.0


@pytest.mark.parametrize("feedback", ["explicit", "ratings"])
def test_positive_rate_is_gated_where_negatives_can_exist(feedback):
    result = validate_snapshot(_all_clicks(), _users(), _items(), START, END, None, GateConfig(), now=NOW,
                               feedback=feedback)
    assert _failed(result) == {"events.positive rate"}
    assert result.check("events.positive rate").observed == pytest.approx(1.0)


def test_implicit_feedback_is_not_gated_on_positive_rate():
    result = validate_snapshot(_all_clicks(), _users(), _items(), START, END, SnapshotStats(20, 0.35, 2.0),
                               GateConfig(), now=NOW, feedback="implicit")
    assert result.passed, result.summary()
    check = result.check("events.positive rate")
    assert check.passed and check.detail.startswith("not applied: implicit feedback")
    assert result.stats == SnapshotStats(row_count=20, positive_rate=1.0, window_days=2.0)


def test_rows_extract_could_not_keep_are_gated():
    # what extract reports for partition dt=2026-01-02 holding 6 rows stamped in 2030 and 1 stamped Jan 1
    misplaced = {"rows": 7, "outside_window": 6, "by_day": {"2026-01-02": 7},
                 "examples": [{"partition": "dt=2026-01-02", "event_id": "z1", "ts": "2030-01-02T00:00:00+00:00"}]}
    result = validate_snapshot(_events(), _users(), _items(), START, END, None, GateConfig(), now=NOW,
                               misplaced=misplaced)
    assert _failed(result) == {"events.ts on partition day"}
    check = result.check("events.ts on partition day")
    assert (check.observed, check.threshold) == (7, 0)
    assert check.detail.startswith("7 row(s) of the window's partitions have a ts outside their partition's day, "
                                   "6 of them outside the window; extract kept none of them (dt=2026-01-02: 7)")
    assert check.examples[0]["event_id"] == "z1"
    relaxed = validate_snapshot(_events(), _users(), _items(), START, END, None,
                                GateConfig(max_misplaced_events=7), now=NOW, misplaced=misplaced)
    assert relaxed.passed and relaxed.check("events.ts on partition day").passed


def test_an_empty_day_inside_the_window_fails_unless_gaps_are_allowed():
    # a three-day window [Jan 1, Jan 4) whose middle day has no events; Jan 1 has 12 events, Jan 3 has 8
    events = _events()
    events["ts"] = events.ts.where(events.ts < pd.Timestamp("2026-01-02", tz="UTC"),
                                   events.ts + pd.Timedelta(days=1))

    def gate(config):
        return validate_snapshot(events, _users(), _items(), START, "2026-01-04", None, config, now="2026-01-05")

    result = gate(GateConfig())
    assert _failed(result) == {"events.every day has events"}
    check = result.check("events.every day has events")
    assert (check.observed, check.threshold, check.examples) == (1, 0, ["2026-01-02"])
    assert check.detail == "1 of 3 day(s) of the window have no events; allowed 0"
    assert gate(GateConfig(max_empty_days=1)).passed


def test_an_empty_last_day_fails_even_when_gaps_are_allowed():
    # the window [Jan 1, Jan 4) holds Jan 1 and Jan 2 only: the day the holdout is cut from is empty
    result = validate_snapshot(_events(), _users(), _items(), START, "2026-01-04", None,
                               GateConfig(max_empty_days=5), now="2026-01-05")
    assert _failed(result) == {"events.last day has events"}
    check = result.check("events.last day has events")
    assert (check.observed, check.detail) == (0, "0 events on the window's last day 2026-01-03")
    assert result.check("events.every day has events").observed == 1


def test_negative_ids_fail_naming_value_and_row():
    events, items = _events(), _items()
    events.loc[[3, 7], "item_id"] = -1  # FAISS's "no result": such an item would vanish from every answer
    items.loc[2, "item_id"] = -1
    result = _gate(events=events, items=items)
    assert {"events.item_id not negative", "items.item_id not negative"} <= _failed(result)
    check = result.check("events.item_id not negative")
    assert (check.observed, check.detail, check.examples) == (2, "2 of 20 rows negative (rows [3, 7])", [-1])
    assert result.check("items.item_id not negative").detail == "1 of 4 rows negative (rows [2])"
    for name in ("events.user_id not negative", "events.context_item_id not negative", "users.user_id not negative"):
        assert result.check(name).passed


def test_days_an_import_recorded_as_empty_are_gaps_not_failures(tmp_path):
    """import -> extract -> gate: a gap in the imported data passes; a partition lost after the import fails."""
    import shutil

    from towerflow.data.interactions import import_interactions
    from towerflow.data.source import ParquetSource
    from towerflow.tasks.extract import extract

    f = tmp_path / "log.csv"  # Jan 1, 2 and 4 of 2026: Jan 3 has no events in the data itself
    f.write_text("user,item,timestamp\n" + "".join(f"{u},{10 + u},2026-01-0{d}T1{u}:00:00Z\n"
                                                    for d in (1, 2, 4) for u in (1, 2)))
    import_interactions(str(f), str(tmp_path / "src"))

    def gate(snapshots: str):
        snap = extract(ParquetSource(str(tmp_path / "src")), pd.Timestamp("2026-01-05"), 4, tmp_path / snapshots)
        return validate_snapshot(snap.events(), snap.users(), snap.items(), *snap.window, None, GateConfig(),
                                 now="2026-01-06", feedback=snap.feedback, misplaced=snap.misplaced,
                                 known_empty_days=snap.known_empty_days)

    result = gate("snaps")
    assert result.passed, result.summary()
    assert result.check("events.every day has events").detail == (
        "0 of 4 day(s) of the window have no events; allowed 0 (1 more recorded by the source as empty in the data "
        "it imported)")
    shutil.rmtree(tmp_path / "src" / "events" / "dt=2026-01-02")  # lost after the import: not a recorded gap
    lost = gate("snaps-2")
    assert _failed(lost) == {"events.every day has events"}
    assert lost.check("events.every day has events").examples == ["2026-01-02"]


def test_queries_are_gated_on_length_and_surface():
    ev = _events()  # rows 2, 6, 10, 14, 18 are on search and carry "shoes"
    ev.loc[6, "query"] = "x" * 257  # one character over the limit /retrieve accepts
    ev.loc[10, "query"] = "y" * 256  # exactly the limit: fine
    ev.loc[[0, 1], "query"] = "shoes"  # homefeed and related: a query the service could never receive there
    result = _gate(ev)
    assert _failed(result) == {"events.query at most 256 characters", "events.query only on search"}
    too_long = result.check("events.query at most 256 characters")
    assert (too_long.observed, too_long.detail) == (1, "1 of 20 rows longer than 256 characters (rows [6])")
    off = result.check("events.query only on search")
    assert (off.observed, off.examples) == (2, ["homefeed", "related"])
    assert off.detail == "2 of 20 rows a query on this surface (rows [0, 1])"
