"""Live items without a release: the item rows' rules (check_items) and the side index's search and merge, by hand."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from towerflow.serving.realtime.live_items import ItemBatchError, LiveIndex, check_items, same_item

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def item(i: int, **kw) -> dict:
    return {"item_id": i, "category": "topic_01", "genres": "kalo|mira", "title": f"Item {i}",
            "created_ts": "2026-01-05T10:00:00Z", "features": [0.5, -1.0, 2.0], **kw}


def test_a_good_batch_is_conformed_and_an_identical_repeat_is_one_item():
    df = check_items([item(7), item(8, genres=None, title=None, created_ts=None), item(7)], dense_dim=3, now=NOW)
    assert df["item_id"].tolist() == [7, 8]
    assert df.loc[0, "created_ts"] == datetime(2026, 1, 5, 10, tzinfo=UTC)
    assert df.loc[1, "genres"] is None and df.loc[1, "title"] is None and pd.isna(df.loc[1, "created_ts"])
    assert df.loc[0, "features"].dtype == np.float32 and df.loc[0, "features"].tolist() == [0.5, -1.0, 2.0]


@pytest.mark.parametrize(("rows", "dense_dim", "row", "message"), [
    ([item(1), item("2")], 3, 1, "items[1].item_id: '2' is not an integer id"),
    ([item(1), item(2), item(-3)], 3, 2, "items[2].item_id: -3 is not in [0, 2**63 - 1]"),
    ([item(2**63)], 3, 0, "items[0].item_id"),
    ([item(1, category=None)], 3, 0, "items[0].category: null is not a non-empty string (required)"),
    ([item(1), item(2, category=4)], 3, 1, "items[1].category: 4 is not a non-empty string"),
    ([item(1, genres=["a", "b"])], 3, 0, "items[0].genres: ['a', 'b'] is not a string or null"),
    ([item(1, title=3.5)], 3, 0, "items[0].title: 3.5 is not a string or null"),
    ([item(1, created_ts=1767607200)], 3, 0, "items[0].created_ts: 1767607200 is not an ISO-8601 time"),
    ([item(1, created_ts="2026-01-06T00:00:00Z")], 3, 0, "items[0].created_ts: '2026-01-06T00:00:00Z' is in the "
                                                         "future"),
    ([item(1), item(2, features=[1.0, 2.0])], 3, 1, "items[1].features: [1.0, 2.0] is not a list of 3 finite "
                                                    "numbers (the release's dense length); got 2 values"),
    ([item(1, features=[1.0, float("nan"), 2.0])], 3, 0, "is not a list of 3 finite numbers"),
    ([item(1, features=[1.0, True, 2.0])], 3, 0, "is not a list of 3 finite numbers"),
    ([item(1)], 0, 0, "items[0].features: [0.5, -1.0, 2.0] given, but the served release has no dense features"),
    ([item(1, colour="red")], 3, 0, "items[0]: unknown field(s) ['colour']"),
    ([item(1), "x"], 3, 1, "items[1]: an item is a JSON object, got str"),
    ([item(5), item(6), item(5, category="topic_02")], 3, 2, "items[2].item_id: 5 names two different items in "
                                                             "this batch (rows [0, 2])"),
])
def test_a_bad_row_refuses_the_batch_and_is_named(rows, dense_dim, row, message):
    with pytest.raises(ItemBatchError) as err:
        check_items(rows, dense_dim=dense_dim, now=NOW)
    assert err.value.row == row
    assert message in str(err.value)


def test_an_empty_batch_is_refused():
    with pytest.raises(ItemBatchError, match="empty batch"):
        check_items([], dense_dim=3, now=NOW)


def test_features_may_be_left_out_and_without_dense_the_column_is_dropped():
    df = check_items([item(1, features=None)], dense_dim=3, now=NOW)
    assert df.loc[0, "features"] is None
    assert "features" not in check_items([item(1, features=None)], dense_dim=0, now=NOW).columns


def test_same_item_allows_json_rounding_of_features_only():
    a = check_items([item(1)], dense_dim=3, now=NOW).iloc[0].to_dict()
    assert same_item(a, {**a, "features": [0.5000000001, -1.0, 2.0]})
    assert not same_item(a, {**a, "features": [0.51, -1.0, 2.0]})
    assert not same_item(a, {**a, "title": "other"})
    assert not same_item(a, {**a, "created_ts": None})


def test_the_side_index_is_searched_exactly_and_merged_with_the_release_answer_by_score():
    live = LiveIndex.empty("r", 2).with_items(np.array([10, 11, 12]), np.array([[1, 0], [0, 1], [-1, 0]], np.float32))
    u = np.array([[0.7, 0.2]], dtype=np.float32)
    s, ids = live.search(u, 2)  # scores 0.7, 0.2, -0.7
    assert ids.tolist() == [[10, 11]] and np.allclose(s, [[0.7, 0.2]])
    main_s, main_ids = np.array([[0.9, 0.5, 0.0]], np.float32), np.array([[1, 2, -1]])
    s, ids = live.merge(u, main_s, main_ids, 3)
    assert ids.tolist() == [[1, 10, 2, 11, 12, -1]]
    assert np.allclose(s[0, :5], [0.9, 0.7, 0.5, 0.2, -0.7])
    # an add makes a new index: the old one (held by a request in flight) is unchanged
    more = live.with_items(np.array([11, 13]), np.array([[5, 5], [0, -1]], np.float32))
    assert len(live) == 3 and more.item_ids.tolist() == [10, 11, 12, 13]
    assert more.vectors[1].tolist() == [0, 1]  # an id already held keeps its vector
    assert LiveIndex.empty("r", 2).merge(u, main_s, main_ids, 3)[1].tolist() == main_ids.tolist()
