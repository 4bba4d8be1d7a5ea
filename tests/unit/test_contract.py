from datetime import UTC, date, datetime

import pandas as pd
import pytest

from towerflow.contract import ContractError, conform
from towerflow.data.source import ParquetSink, ParquetSource, SourceError, day_range


def _events(n: int, day: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [f"{day}-{i}" for i in range(n)],
            "user_id": [1] * n,
            "item_id": list(range(n)),
            "action": ["click"] * n,
            "ts": [f"{day}T0{i}:00:00Z" for i in range(n)],
            "surface": ["related"] * n,
            "context_item_id": [None, 5][:n] + [None] * max(0, n - 2),
            "query": [None] * n,
        }
    )


def test_conform_keeps_contract_order_and_types():
    df = conform(_events(2, "2026-01-01"), "events")
    assert list(df.columns[:8]) == ["event_id", "user_id", "item_id", "action", "ts", "surface", "context_item_id", "query"]
    assert str(df.ts.dtype) == "datetime64[us, UTC]"
    assert df.context_item_id.isna().tolist() == [True, False]


def test_missing_column_names_it():
    with pytest.raises(ContractError, match=r"events in x.csv: missing required column\(s\) \['surface'\]"):
        conform(_events(1, "2026-01-01").drop(columns="surface"), "events", where="x.csv")


def test_unparseable_timestamp_is_named():
    bad = _events(1, "2026-01-01").assign(ts=["yesterday-ish"])
    with pytest.raises(ContractError, match="events.ts.*unparseable"):
        conform(bad, "events")


def test_day_range_is_half_open():
    days = day_range(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC))
    assert days == [date(2026, 1, 1), date(2026, 1, 2)]


def test_parquet_round_trip_reads_only_window(tmp_path):
    sink = ParquetSink(str(tmp_path / "src"))
    for d in ("2026-01-01", "2026-01-02", "2026-01-03"):
        sink.write_events_day(date.fromisoformat(d), _events(3, d))
    sink.write_users(pd.DataFrame({"user_id": [1], "signup_ts": ["2025-01-01"], "country": ["fr"]}))
    sink.write_items(pd.DataFrame({"item_id": [0, 1, 2], "category": ["a", "b", "a"], "genres": [None] * 3,
                                   "title": ["x", "y", "z"], "created_ts": ["2025-01-01"] * 3}))
    src = ParquetSource(str(tmp_path / "src"))
    assert src.days() == [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]
    ev = src.read_events(datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC))
    assert ev.event_id.tolist() == ["2026-01-02-0", "2026-01-02-1", "2026-01-02-2"]
    assert src.read_users().country.tolist() == ["fr"]
    f1 = src.fingerprint(datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC))
    f2 = src.fingerprint(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC))
    assert f1 != f2 and len(f1) == 64


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        ParquetSource(str(tmp_path / "nope"))


def test_feedback_kinds_and_where_negatives_can_exist():
    from towerflow.contract import FEEDBACK_KINDS, check_feedback, negatives_possible

    assert FEEDBACK_KINDS == ("explicit", "ratings", "implicit")
    assert [negatives_possible(k) for k in FEEDBACK_KINDS] == [True, True, False]
    with pytest.raises(ContractError, match=r"^src/source\.json: unknown feedback kind 'likes' \(allowed: "
                                            r"\['explicit', 'ratings', 'implicit'\]\)$"):
        check_feedback("likes", where="src/source.json")
