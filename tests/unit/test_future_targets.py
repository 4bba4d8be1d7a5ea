"""Future targets: which rows are copied with which history, and what auto chooses."""

from __future__ import annotations

import numpy as np
import pytest

from towerflow.config import TrainConfig
from towerflow.tasks.build_examples import SequenceExamples
from towerflow.tasks.future_targets import future_window, with_future_targets

# Rows in table order (time-sorted as build_examples writes them; users interleave). Each row's history is marked by
# its own row number in hist_items[:, -1] (10 + row), so a copy's history says which row it came from.
USERS = [1, 2, 1, 1, 2, 0, 0, 1]
TS = [10, 11, 20, 20, 30, 40, 41, 50]  # rows 2 and 3 tie: the table order decides (2 before 3)
TARGETS = [101, 201, 102, 103, 202, 901, 902, 104]


def _train() -> SequenceExamples:
    n = len(USERS)
    hist = np.zeros((n, 3), dtype=np.int64)
    hist[:, -1] = 10 + np.arange(n)
    return SequenceExamples(
        user_idx=np.array(USERS), hist_items=hist, hist_actions=np.ones_like(hist), hist_gaps=hist % 7,
        context_items=np.arange(n) + 500, surface=np.arange(n) % 3, target_items=np.array(TARGETS),
        ts=np.array(TS), query=np.arange(n).reshape(n, 1) + 1000,
    )


def test_one_target_is_the_rows_themselves():
    train = _train()
    assert with_future_targets(train, 1) is train


def test_each_later_row_of_the_user_is_copied_with_an_earlier_history():
    # user 1's sequence: rows 0, 2, 3, 7 (targets 101, 102, 103, 104); user 2's: rows 1, 4; user 0 (unknown): none.
    # j = 1 pairs (history row -> request row): 0->2, 2->3, 3->7, 1->4; j = 2: 0->3, 2->7.
    out = with_future_targets(_train(), 3)
    assert len(out) == 8 + 4 + 2
    # each copy right after the row whose request it keeps, so the rows stay in time order
    assert out.target_items.tolist() == [101, 201, 102, 102, 103, 103, 103, 202, 202, 901, 902, 104, 104, 104]
    assert (np.diff(out.ts) >= 0).all()
    is_copy = out.hist_items[:, -1] - 10 != np.array([0, 1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 7, 7, 7])
    assert is_copy.sum() == 6
    copies = out.take(is_copy)
    history_row = copies.hist_items[:, -1] - 10
    pairs = sorted(zip(history_row.tolist(), copies.target_items.tolist(), strict=True))
    assert pairs == [(0, 102), (0, 103), (1, 202), (2, 103), (2, 104), (3, 104)]
    # the copy keeps the later row's request (time, viewed item, surface, query) and the earlier row's history
    request_row = {102: 2, 103: 3, 104: 7, 202: 4}
    for k in range(len(copies)):
        r, h = request_row[int(copies.target_items[k])], int(history_row[k])
        assert copies.ts[k] == TS[r] and copies.context_items[k] == 500 + r and copies.surface[k] == r % 3
        assert copies.query[k, 0] == 1000 + r
        assert copies.user_idx[k] == USERS[h] and copies.hist_gaps[k, -1] == (10 + h) % 7


def test_a_window_longer_than_any_sequence_stops_at_the_last_pair():
    assert len(with_future_targets(_train(), 10)) == 8 + 4 + 2 + 1  # j = 3: 0->7 only


def test_auto_is_three_on_leave_one_out_and_one_on_the_time_split():
    assert future_window("auto", "leave_one_out")[0] == 3
    assert future_window("auto", "time")[0] == 1
    assert future_window(2, "time") == (2, None)
    with pytest.raises(ValueError, match="future_targets must be >= 1"):
        with_future_targets(_train(), 0)
    for bad in (0, 17):
        with pytest.raises(ValueError, match=rf"number of targets in \[1, 16\], got {bad}"):
            TrainConfig(future_targets=bad)
