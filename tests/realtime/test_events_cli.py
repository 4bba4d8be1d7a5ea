"""``towerflow events ingest`` (NDJSON, CSV, Parquet, stdin; into the store, or POSTed to a running service) and
``towerflow events compact``, on a source of 3 users and 4 items."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from tests.servers import running_app
from towerflow.cli import main
from towerflow.config import Settings
from towerflow.data.source import ParquetSink, ParquetSource
from towerflow.serving.realtime.store import SQLiteActionStore


@pytest.fixture
def root(data_root: Path) -> Path:
    sink = ParquetSink(str(data_root / "source"))
    sink.write_users(pd.DataFrame({"user_id": [1, 2, 3], "signup_ts": [datetime(2025, 1, 1, tzinfo=UTC)] * 3}))
    sink.write_items(pd.DataFrame({"item_id": [10, 11, 12, 13], "category": ["a", "b", "a", "b"],
                                   "genres": [None] * 4, "title": [None] * 4, "created_ts": [None] * 4}))
    return data_root


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"event_id": f"e{i}", "user_id": 1 + i % 3, "item_id": 10 + i % 4, "action": "click",
             "ts": f"2026-01-05T10:00:{i:02d}Z", "surface": "homefeed"} for i in range(start, start + n)]


def ndjson(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stored(root: Path) -> list[str]:
    store = SQLiteActionStore(root / "realtime.sqlite")
    return [r[0] for r in store.read(1, store.last_seq())]


def test_ingest_ndjson_twice_then_compact(root: Path, tmp_path: Path, capsys):
    f = ndjson(tmp_path / "a.ndjson", rows(5))
    assert main(["events", "ingest", str(f)]) == 0
    assert "5 events stored, 0 already stored" in capsys.readouterr().out
    assert main(["events", "ingest", str(f)]) == 0
    assert "0 events stored, 5 already stored" in capsys.readouterr().out
    assert stored(root) == [f"e{i}" for i in range(5)]
    assert main(["events", "compact"]) == 0
    assert "compacted 5 events into 1 files" in capsys.readouterr().out  # (users 1, 2, 3, 1, 2)
    day = ParquetSource(str(root / "source")).read_day(datetime(2026, 1, 5).date())
    assert sorted(day.event_id) == [f"e{i}" for i in range(5)]
    assert main(["events", "compact", "--keep-per-user", "1"]) == 0  # nothing new; the store keeps 1 per user
    assert "compacted 0 events into 0 files" in (out := capsys.readouterr().out) and "2 compacted events pruned" in out
    assert stored(root) == ["e2", "e3", "e4"]


def test_a_bad_row_refuses_the_whole_file(root: Path, tmp_path: Path, capsys):
    bad = rows(3)
    bad[2]["user_id"] = 9
    f = ndjson(tmp_path / "bad.ndjson", bad)
    assert main(["events", "ingest", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"error: {f}[2].user_id: 9 is unknown to the source's users table" in err
    assert stored(root) == []
    (tmp_path / "broken.ndjson").write_text(json.dumps(rows(1)[0]) + "\n{oops\n")
    assert main(["events", "ingest", str(tmp_path / "broken.ndjson")]) == 1
    assert "broken.ndjson, line 2: not JSON" in capsys.readouterr().err
    assert main(["events", "ingest", str(tmp_path / "x.txt")]) == 1
    assert "cannot tell the format from '.txt'" in capsys.readouterr().err


def test_csv_parquet_and_stdin(root: Path, tmp_path: Path, monkeypatch, capsys):
    csv = pd.DataFrame(rows(2))
    csv["context_item_id"], csv["query"], csv["surface"] = [None, 12], [None, "shoes"], ["homefeed", "search"]
    csv.to_csv(tmp_path / "a.csv", index=False)
    assert main(["events", "ingest", str(tmp_path / "a.csv")]) == 0
    pq = pd.DataFrame(rows(2, start=2)).assign(ts=lambda d: pd.to_datetime(d.ts, utc=True))
    pq.to_parquet(tmp_path / "b.parquet")
    assert main(["events", "ingest", str(tmp_path / "b.parquet")]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in rows(2, start=4))))
    assert main(["events", "ingest", "-"]) == 0
    assert "<stdin>: 2 events stored" in capsys.readouterr().out
    store = SQLiteActionStore(root / "realtime.sqlite")
    records = store.read(1, 6)
    assert [r[0] for r in records] == [f"e{i}" for i in range(6)]
    assert records[1][6:] == (12, "shoes", None) and records[0][6:] == (None, None, None)


@pytest.fixture
def service_url(root: Path) -> Iterator[str]:
    """A real HTTP server (uvicorn on a free port) over a service with no release: /events needs none."""
    from towerflow.serving.app import create_app
    from towerflow.serving.service import RetrievalService

    svc = RetrievalService(Settings(), use_default_store=False)
    with running_app(create_app(service=svc)) as url:
        yield url


def test_ingest_posts_to_a_running_service_in_batches(root: Path, tmp_path: Path, service_url: str, capsys):
    f = ndjson(tmp_path / "a.ndjson", rows(7))
    assert main(["events", "ingest", str(f), "--url", service_url, "--batch-size", "3"]) == 0
    assert f"7 events stored, 0 already stored (via {service_url}/events)" in capsys.readouterr().out
    assert stored(root) == [f"e{i}" for i in range(7)]
    bad = rows(5, start=7)
    bad[4]["action"] = "like"
    assert main(["events", "ingest", str(ndjson(tmp_path / "b.ndjson", bad)), "--url", service_url,
                 "--batch-size", "3"]) == 1
    err = capsys.readouterr().err
    assert "refused the batch of rows 3..4 with 422: events[1].action: 'like' is not one of" in err
    assert "(row 4 of" in err and "3 events stored before it" in err
    assert stored(root) == [f"e{i}" for i in range(10)]  # the first batch of 3 was acknowledged, the second not


def test_posts_are_cut_by_bytes_as_well_as_by_count():
    from towerflow.commands.events import batch_bodies
    from towerflow.errors import TowerflowError

    rows = [{"event_id": f"e{i}", "pad": "x" * 10} for i in range(5)]  # 39 bytes of JSON each
    assert len(json.dumps(rows[0])) == 39
    # {"events": [ + rows joined by ", " + ]}: 14 + 39n + 2(n - 1) bytes; 100 fits 2 rows (94), not 3 (135)
    out = list(batch_bodies(rows, max_events=10, max_bytes=100))
    assert [(start, n) for start, n, _ in out] == [(0, 2), (2, 2), (4, 1)]
    assert [len(body) for _, _, body in out] == [94, 94, 53]
    assert [e["event_id"] for _, _, body in out for e in json.loads(body)["events"]] == [r["event_id"] for r in rows]
    assert [(start, n) for start, n, _ in batch_bodies(rows, max_events=3, max_bytes=10_000)] == [(0, 3), (3, 2)]
    with pytest.raises(TowerflowError, match="row 0 alone is 39 bytes of JSON: over the body limit of 52 bytes"):
        list(batch_bodies(rows, max_events=10, max_bytes=52))
