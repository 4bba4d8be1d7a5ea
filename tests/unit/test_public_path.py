"""The public-path benchmark's pure parts (bench/public_path.py) and the retrain command's default window."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pandas as pd
import pytest

from bench.public_path import figures, hit_ndcg, json_tail, last_after_ties, leave_last_out, mean_se, rank_of
from towerflow.commands.retrain import default_window

# user 1: two rows at t=30 (a tie): the later row in the file (item 2) is withheld, not the larger item (7)
# user 2: one row only: kept, nothing withheld
# user 3: plain; its last (t=50, item 4) withheld
ROWS = [(1, 5, 10), (1, 7, 30), (3, 1, 5), (1, 2, 30), (2, 9, 3), (3, 4, 50), (1, 3, 20), (3, 8, 40)]


def _frame(rows=ROWS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def test_leave_last_out_withholds_each_users_last_ties_in_file_order():
    rest, withheld = leave_last_out(_frame())
    assert withheld.values.tolist() == [[1, 2, 30], [3, 4, 50]]
    assert withheld.index.tolist() == [3, 5]  # the input's rows
    # everything else kept, in the input's order
    assert rest.values.tolist() == [[1, 5, 10], [1, 7, 30], [3, 1, 5], [2, 9, 3], [1, 3, 20], [3, 8, 40]]


def test_the_baselines_examples_hold_out_exactly_the_withheld_rows(tmp_path):
    """Imported whole (each withheld row one second later), build_examples' leave-one-out holds out the withheld
    rows, although the importer orders ties by item id (it would hold out user 1's item 7)."""
    from towerflow.config import ExamplesConfig
    from towerflow.data.interactions import import_interactions
    from towerflow.data.source import ParquetSource
    from towerflow.tasks.build_examples import build_examples

    df = _frame([(u, i, 1_000_000 + t) for u, i, t in ROWS])
    _, withheld = leave_last_out(df)
    shifted = last_after_ties(df, withheld)
    assert (shifted.timestamp - df.timestamp).tolist() == [0, 0, 0, 1, 0, 1, 0, 0]

    def holdout(frame: pd.DataFrame, name: str) -> list[tuple[int, int]]:
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        import_interactions(str(tmp_path / f"{name}.csv"), str(tmp_path / name))
        src = ParquetSource(str(tmp_path / name))
        end = pd.Timestamp("1970-01-14", tz="UTC").to_pydatetime()
        ex = build_examples(src.read_events(pd.Timestamp("1970-01-01", tz="UTC").to_pydatetime(), end),
                            src.read_users(), src.read_items(), end,
                            ExamplesConfig(split="leave_one_out", max_holdout_users=None))
        return sorted(zip(ex.vocab.user_ids[ex.holdout.user_idx - 1].tolist(),
                          ex.vocab.item_ids[ex.holdout.target_items - 1].tolist(), strict=True))

    assert [tuple(r) for r in withheld[["user", "item"]].values.tolist()] == [(1, 2), (3, 4)]
    # build_examples also holds out user 2's only row (nothing before it); the benchmark withholds nothing there
    assert holdout(shifted, "shifted") == [(1, 2), (2, 9), (3, 4)]
    assert holdout(df, "as_is") == [(1, 7), (2, 9), (3, 4)]  # why the shift: ties by item id otherwise


def test_rank_and_metrics_by_hand():
    assert rank_of(4, [9, 4, 1]) == 2
    assert rank_of(5, [9, 4, 1]) is None
    # ranks 1, 3, missing, 11 (beyond k=10)
    hit, ndcg = hit_ndcg([1, 3, None, 11])
    assert hit.tolist() == [1, 1, 0, 0]
    assert ndcg == pytest.approx([1.0, 0.5, 0.0, 0.0])  # 1/log2(2), 1/log2(4)
    f = figures([1, 3, None, 11])
    assert f["hr@10"] == 0.5 and f["ndcg@10"] == pytest.approx(0.375) and f["n"] == 4
    # hits 1,1,0,0: sample sd = sqrt(4 * 0.25 / 3) = 0.57735; se = sd / 2
    assert f["hr@10_se"] == pytest.approx(0.288675, abs=1e-6)
    # ndcg 1, .5, 0, 0: mean .375, squared deviations .390625+.015625+.140625*2 = .6875; sd = sqrt(.6875/3)
    assert f["ndcg@10_se"] == pytest.approx(np.sqrt(0.6875 / 3) / 2)


def test_mean_se_edges():
    assert mean_se(np.array([0.5, 0.5])) == (0.5, 0.0)
    m, se = mean_se(np.array([1.0]))
    assert m == 1.0 and np.isnan(se)


def test_json_tail_skips_what_was_printed_before():
    doc = {"status": "promoted", "metrics": {"hr@10": 0.25}}
    assert json_tail("12:00 | INFO | {not json}\n" + json.dumps(doc, indent=2) + "\n") == doc
    with pytest.raises(ValueError, match="no JSON"):
        json_tail("nothing here\n")


def test_retrain_default_window_covers_imported_data():
    days = [date(1997, 9, 20), date(1998, 1, 1), date(1998, 4, 22)]
    today = date(2026, 12, 2)
    assert default_window(days, None, "all", today) == (date(1998, 4, 23), 215)  # 1998-04-23 - 215 d = 1997-09-20
    assert default_window(days, None, 7, today) == (date(1998, 4, 23), 7)
    assert default_window(days, date(1998, 1, 2), "all", today) == (date(1998, 1, 2), 104)
    # live data (its last partition is today's): the window ends today, as before
    assert default_window([date(2026, 11, 1), today], None, 7, today) == (today, 7)
