"""``towerflow items add`` into the source's items table (no service): checked whole, written once, idempotent."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towerflow.cli import main
from towerflow.data.source import ParquetSink, ParquetSource


@pytest.fixture
def root(data_root: Path) -> Path:
    sink = ParquetSink(str(data_root / "source"))
    sink.write_users(pd.DataFrame({"user_id": [1, 2], "signup_ts": [datetime(2025, 1, 1, tzinfo=UTC)] * 2}))
    sink.write_items(pd.DataFrame({"item_id": [10, 11], "category": ["a", "b"], "genres": ["x|y", None],
                                   "title": [None, "t"], "created_ts": [datetime(2025, 6, 1, tzinfo=UTC)] * 2,
                                   "features": [np.array([1, 0], np.float32), np.array([0, 1], np.float32)]}))
    return data_root


def item(i: int, **kw) -> dict:
    return {"item_id": i, "category": "a", "genres": "x", "title": f"new {i}", "created_ts": "2026-01-05T10:00:00Z",
            "features": [0.25, -0.5], **kw}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_items_add_writes_new_items_once(root: Path, tmp_path: Path, capsys):
    f = write(tmp_path / "new.ndjson", [item(20), item(21, genres=None, features=None)])
    assert main(["items", "add", str(f)]) == 0
    assert "2 items added" in capsys.readouterr().out
    assert main(["items", "add", str(f)]) == 0
    assert "0 items added to" in (out := capsys.readouterr().out) and "2 already there" in out
    table = ParquetSource(str(root / "source")).read_items().set_index("item_id")
    assert sorted(table.index) == [10, 11, 20, 21]
    assert table.loc[20, "features"].tolist() == [0.25, -0.5] and table.loc[20, "title"] == "new 20"
    assert table.loc[21, "features"] is None or np.isnan(table.loc[21, "features"]).all()
    assert table.loc[20, "created_ts"] == pd.Timestamp("2026-01-05T10:00:00Z")


def test_items_add_refuses_a_bad_file_whole_naming_the_row(root: Path, tmp_path: Path, capsys):
    f = write(tmp_path / "bad.ndjson", [item(30), item(31, features=[1.0, 2.0, 3.0])])
    assert main(["items", "add", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}[1].features: [1.0, 2.0, 3.0] is not a list of 2 finite numbers" in err
    f = write(tmp_path / "clash.ndjson", [item(32), item(10, category="b")])  # 10 is in the table as category a
    assert main(["items", "add", str(f)]) == 1
    assert f"{f}[1].item_id: 10 is already in the source's items table as another item" in capsys.readouterr().err
    assert sorted(ParquetSource(str(root / "source")).read_items()["item_id"]) == [10, 11]
