"""The hand-off to the source is exactly once: a compaction killed between its files (or before its mark moved)
is finished by the next one under the same file names, events arriving meanwhile wait for the next range, and a
source reader sees every acknowledged event once, with the content it was acknowledged with."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from towerflow.data.source import ParquetSink, ParquetSource
from towerflow.serving.realtime.compact import CompactionBusy, compact, compact_step, file_name
from towerflow.serving.realtime.events import check_events
from towerflow.serving.realtime.store import CompactionMark, SQLiteActionStore

NOW = datetime(2026, 1, 7, tzinfo=UTC)
T0 = datetime(2026, 1, 4, 23, 59, 58, tzinfo=UTC)  # two seconds before midnight: batches straddle two days


def batch(first: int, n: int):
    """Events first .. first + n - 1, one second apart from T0 + first seconds."""
    return check_events([{"event_id": f"e{i:04d}", "user_id": i % 3, "item_id": 100 + i, "action": "click",
                          "ts": (T0 + timedelta(seconds=i)).isoformat(), "surface": "homefeed"}
                         for i in range(first, first + n)], now=NOW)


def source_ids(uri: str) -> list[str]:
    events = ParquetSource(uri).read_events(T0 - timedelta(days=1), T0 + timedelta(days=2))
    return sorted(events.event_id)


def test_one_file_per_day_and_range_then_nothing(store, tmp_path: Path):
    uri = str(tmp_path / "source")
    store.append(batch(0, 4))  # e0000, e0001 on Jan 4; e0002, e0003 on Jan 5
    out = compact(store, uri)
    assert out.events == 4 and out.high_water == 4
    assert out.files == [f"events/dt=2026-01-04/{file_name(1, 4)}", f"events/dt=2026-01-05/{file_name(1, 4)}"]
    src = ParquetSource(uri)
    assert src.days() == [date(2026, 1, 4), date(2026, 1, 5)]
    assert src.read_day(date(2026, 1, 5)).event_id.tolist() == ["e0002", "e0003"]
    assert compact(store, uri).events == 0
    store.append(batch(4, 3))
    assert compact(store, uri, max_rows=2).files[-1].endswith(file_name(7, 7))  # ranges 5-6, then 7
    assert source_ids(uri) == [f"e{i:04d}" for i in range(7)]
    assert store.compaction_mark() == CompactionMark(7, None)


def test_a_compaction_that_died_between_its_files_is_finished_exactly_once(store, tmp_path: Path, monkeypatch):
    uri = str(tmp_path / "source")
    store.append(batch(0, 4))
    real = ParquetSink.write_events_day
    calls = []

    def dies_after_the_first_file(self, day, df, part=0, name=None):
        calls.append(day)
        if len(calls) == 2:
            raise OSError("killed")
        return real(self, day, df, part, name)

    monkeypatch.setattr(ParquetSink, "write_events_day", dies_after_the_first_file)
    with pytest.raises(OSError, match="killed"):
        compact_step(store, ParquetSink(uri))
    monkeypatch.setattr(ParquetSink, "write_events_day", real)
    assert store.compaction_mark() == CompactionMark(0, (1, 4))  # the range is pending, the mark did not move
    assert source_ids(uri) == ["e0000", "e0001"]  # half of it is in the source

    store.append(batch(4, 2))  # arrives before the retry: not part of the pending range
    out = compact(store, uri)
    assert out.events == 6 and out.high_water == 6
    assert source_ids(uri) == [f"e{i:04d}" for i in range(6)]  # each once: the Jan 4 file was replaced, not doubled
    day4 = sorted(p.name for p in (Path(uri) / "events" / "dt=2026-01-04").iterdir())
    assert day4 == [file_name(1, 4)]
    day5 = sorted(p.name for p in (Path(uri) / "events" / "dt=2026-01-05").iterdir())
    assert day5 == [file_name(1, 4), file_name(5, 6)]


def test_the_content_is_what_was_acknowledged(store, tmp_path: Path):
    uri = str(tmp_path / "source")
    acked = check_events([{"event_id": "x", "user_id": 5, "item_id": 9, "action": "skip",
                           "ts": "2026-01-05T12:00:00.000001Z", "surface": "search", "context_item_id": 3,
                           "query": "shoes"}], now=NOW)
    store.append(acked)
    compact(store, uri)
    back = ParquetSource(uri).read_day(date(2026, 1, 5))
    assert back.to_dict("records") == acked.to_dict("records")


def test_request_id_the_contracts_optional_column_goes_through_where_events_carry_it(store, tmp_path: Path):
    uri = str(tmp_path / "source")
    rows = [{"event_id": f"r{i}", "user_id": 5, "item_id": 9 + i, "action": "impression", "surface": "homefeed",
             "ts": f"2026-01-0{5 + i}T12:00:00Z", **({"request_id": "q-1"} if i == 0 else {})} for i in range(2)]
    acked = check_events(rows, now=NOW)
    assert acked["request_id"].iloc[0] == "q-1" and acked["request_id"].isna().tolist() == [False, True]
    assert "request_id" not in check_events(rows[1:], now=NOW).columns  # no row sets it: no column
    store.append(acked)
    assert [r[-1] for r in store.recent(5)] == ["q-1", None]
    compact(store, uri)
    day5, day6 = (ParquetSource(uri).read_day(date(2026, 1, d)) for d in (5, 6))
    assert day5["request_id"].tolist() == ["q-1"] and "request_id" not in day6.columns
    with pytest.raises(ValueError, match=r"events\[0\].request_id: 7 is not a string or null"):
        check_events([{**rows[0], "request_id": 7}], now=NOW)


def test_an_event_already_in_its_days_partition_is_not_written_again(store, tmp_path: Path):
    uri = str(tmp_path / "source")
    ParquetSink(uri).write_events_day(date(2026, 1, 5), batch(2, 2))  # e0002, e0003 came with the batch data
    store.append(batch(0, 4))  # the day replayed live: e0000 .. e0003
    out = compact(store, uri)
    assert out.events == 2 and out.high_water == 4  # e0000, e0001 (Jan 4); Jan 5's two are there already
    assert out.files == [f"events/dt=2026-01-04/{file_name(1, 4)}"]
    assert source_ids(uri) == ["e0000", "e0001", "e0002", "e0003"]


def test_one_compactor_at_a_time(tmp_path: Path):
    store = SQLiteActionStore(tmp_path / "rt.sqlite")
    store.append(batch(0, 1))
    token = store.lock("compaction", 60)
    with pytest.raises(CompactionBusy, match="another compaction of sqlite:///.*rt.sqlite is running"):
        compact(store, str(tmp_path / "source"))
    store.unlock("compaction", token)
    assert compact(store, str(tmp_path / "source")).events == 1


KILLED = """
import os, signal, sys
from towerflow.data.source import ParquetSink
from towerflow.serving.realtime.compact import compact
from towerflow.serving.realtime.store import SQLiteActionStore

real = ParquetSink.write_events_day
def write_then_die(self, day, df, part=0, name=None):
    real(self, day, df, part, name)
    os.kill(os.getpid(), signal.SIGKILL)  # after the first file of the range, before the second and the mark
ParquetSink.write_events_day = write_then_die
compact(SQLiteActionStore(sys.argv[1]), sys.argv[2], lease_s=0.001)  # its lease lapses at once
"""


def test_kill_9_inside_a_compaction_then_the_next_one(tmp_path: Path):
    path, uri = tmp_path / "rt.sqlite", str(tmp_path / "source")
    store = SQLiteActionStore(path)
    store.append(batch(0, 4))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", KILLED, str(path), uri], cwd=root, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert store.compaction_mark() == CompactionMark(0, (1, 4)) and source_ids(uri) == ["e0000", "e0001"]
    assert compact(store, uri).events == 4
    assert source_ids(uri) == [f"e{i:04d}" for i in range(4)]
