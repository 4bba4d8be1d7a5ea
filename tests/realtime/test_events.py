"""A live batch is checked by the data gate's rules, row by row: a refusal names the row, the column and the rule."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from towerflow.serving.realtime.events import EventBatchError, check_events

NOW = datetime(2026, 1, 6, tzinfo=UTC)


def ev(i: int, **kw) -> dict:
    return {"event_id": f"e{i}", "user_id": 1, "item_id": 10 + i, "action": "click",
            "ts": f"2026-01-05T10:00:0{i}Z", "surface": "homefeed", **kw}


def check(rows, **kw) -> pd.DataFrame:
    return check_events(rows, now=NOW, **kw)


def test_a_good_batch_comes_back_in_contract_dtypes():
    df = check([ev(0), ev(1, surface="related", context_item_id=10, query=None),
                ev(2, action="save", surface="search", query="red shoes")])
    assert list(df.event_id) == ["e0", "e1", "e2"]
    assert df.user_id.dtype == np.int64 and str(df.ts.dtype) == "datetime64[us, UTC]"
    assert df.ts.iloc[1] == pd.Timestamp("2026-01-05T10:00:01Z")
    assert df.context_item_id.isna().tolist() == [True, False, True] and df.context_item_id.iloc[1] == 10
    assert df["query"].tolist() == [None, None, "red shoes"]


@pytest.mark.parametrize(("change", "message"), [
    ({"action": "like"}, "events[1].action: 'like' is not one of ['impression', 'click'"),
    ({"surface": None}, "events[1].surface: null (required)"),
    ({"user_id": -3}, "events[1].user_id: -3 is negative"),
    ({"item_id": "12"}, "events[1].item_id: '12' is not an integer id"),
    ({"item_id": 1.5}, "events[1].item_id: 1.5 is not an integer id"),
    ({"user_id": True}, "events[1].user_id: True is not an integer id"),
    ({"context_item_id": 2**63}, "events[1].context_item_id: 9223372036854775808 is beyond int64"),
    ({"item_id": -(2**63) - 1}, "events[1].item_id: -9223372036854775809 is beyond int64"),
    ({"ts": 1767607200}, "events[1].ts: 1767607200 is not an ISO-8601 string"),
    ({"ts": "yesterday"}, "events[1].ts: 'yesterday' is not a valid ISO-8601 time"),
    ({"ts": "2026-01-06T00:00:06Z"}, "events[1].ts: 2026-01-06T00:00:06+00:00 is in the future (after "
                                     "2026-01-06T00:00:05+00:00)"),
    ({"event_id": ""}, "events[1].event_id: '' is not a non-empty string"),
    ({"query": 7}, "events[1].query: 7 is not a string or null"),
    ({"surface": "search", "query": "q" * 257}, "events[1].query has 257 characters; at most 256 are allowed"),
    ({"query": "red shoes"}, "events[1].query is only allowed on the 'search' surface, got surface 'homefeed'"),
    ({"surface": "related", "query": ""}, "events[1].query is only allowed on the 'search' surface, got surface "
                                          "'related'"),
    ({"colour": "red"}, "events[1]: unknown field(s) ['colour']"),
])
def test_a_bad_row_refuses_the_batch_naming_row_column_and_rule(change, message):
    with pytest.raises(EventBatchError) as err:
        check([ev(0), ev(1, **change), ev(2)])
    assert str(err.value).startswith(message), str(err.value)
    assert err.value.row == 1


def test_a_query_of_256_characters_on_search_is_taken_and_a_file_batch_is_checked_alike():
    df = check([ev(0, surface="search", query="q" * 256), ev(1)])
    assert df["query"].str.len().tolist()[0] == 256
    frame = pd.DataFrame([ev(0), ev(1, query="red shoes"), ev(2)])  # a file's column: NaN where no query
    with pytest.raises(EventBatchError, match=r"^events\[1\]\.query is only allowed on the 'search' surface") as err:
        check(frame)
    assert err.value.row == 1
    assert check(frame.assign(surface=["homefeed", "search", "homefeed"]))["query"].tolist() == [
        None, "red shoes", None]


def test_five_seconds_of_clock_skew_are_allowed():
    assert len(check([ev(0, ts="2026-01-06T00:00:05Z")])) == 1


def test_a_missing_required_field_and_an_empty_batch():
    row = ev(0)
    del row["action"]
    with pytest.raises(EventBatchError, match=r"events\[0\].action: null \(required\)"):
        check([row])
    with pytest.raises(EventBatchError, match="empty batch"):
        check([])
    with pytest.raises(EventBatchError, match=r"events\[1\]: an event is a JSON object, got list"):
        check([ev(0), [1, 2]])


def test_one_event_twice_is_one_event_two_events_under_one_id_are_refused():
    assert check([ev(0), ev(1), ev(0)]).event_id.tolist() == ["e0", "e1"]
    with pytest.raises(EventBatchError, match=r"events\[2\].event_id: 'e0' names two different events in this "
                                              r"batch \(rows \[0, 2\]\)"):
        check([ev(0), ev(1), ev(0, item_id=99)])


def test_ids_unknown_to_the_source_tables_are_refused():
    users, items = np.array([1, 2]), np.array([10, 11, 12])
    known = {"known_users": lambda ids: np.isin(ids, users), "known_items": lambda ids: np.isin(ids, items)}
    assert len(check([ev(0), ev(1, context_item_id=12)], **known)) == 2
    with pytest.raises(EventBatchError, match=r"events\[1\].user_id: 7 is unknown to the source's users table"):
        check([ev(0), ev(1, user_id=7)], **known)
    with pytest.raises(EventBatchError, match=r"events\[0\].item_id: 13 is unknown to the source's items table"):
        check([ev(3)], **known)
    with pytest.raises(EventBatchError, match=r"events\[1\].context_item_id: 99 is unknown to the source's items"):
        check([ev(0), ev(1, context_item_id=99)], **known)


def test_a_table_from_a_file_is_checked_the_same_way():
    df = pd.DataFrame([ev(0), ev(1)])
    df["ts"] = pd.to_datetime(df.ts, utc=True)
    assert check(df, where="x.parquet").ts.tolist() == list(df.ts)
    with pytest.raises(EventBatchError, match=r"x.csv\[1\].action: 'like' is not one of"):
        check(pd.DataFrame([ev(0), ev(1, action="like")]), where="x.csv")
    with pytest.raises(EventBatchError, match=r"x.csv: unknown column\(s\) \['colour'\]"):
        check(pd.DataFrame([ev(0, colour="red")]), where="x.csv")


def test_a_well_formed_json_batch_is_checked_a_column_at_a_time_to_the_same_frame(monkeypatch):
    """JSON objects whose values have their contract types skip the row-by-row path (to_frame is never called);
    the same rows as a table take it: both give the same frame."""
    from towerflow.serving.realtime import events

    rows = [ev(0), ev(1, surface="related", context_item_id=10), ev(2, action="save", surface="search",
                                                                     query="red shoes"), ev(3, query=None)]
    known = {"known_users": lambda ids: np.isin(ids, [1]), "known_items": lambda ids: np.isin(ids, range(10, 14))}
    table = check(pd.DataFrame(rows), **known)

    def row_by_row(*args, **kwargs):
        raise AssertionError("a well-formed JSON batch took the row-by-row path")

    monkeypatch.setattr(events, "to_frame", row_by_row)
    pd.testing.assert_frame_equal(check(rows, **known), table)
    with pytest.raises(AssertionError, match="row-by-row"):  # one bad value anywhere: the row-by-row path
        check([*rows, ev(4, user_id=True)], **known)
