"""Extraction: exact window boundaries, manifest, idempotent content-addressed ids, tamper detection, bad input."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerflow.cli import main
from towerflow.contract import ContractError
from towerflow.data.source import ParquetSink, ParquetSource, SourceError
from towerflow.tasks.extract import EmptyWindowError, ExtractError, Snapshot, SnapshotError, extract

# (event_id, user_id, item_id, action, ts) by partition day; timestamps sit exactly on the boundaries under test.
EVENTS = {
    "2026-01-01": [
        ("a", 1, 1, "click", "2026-01-01T00:00:00Z"),
        ("b", 1, 2, "impression", "2026-01-01T12:00:00Z"),
    ],
    "2026-01-02": [
        ("c", 2, 1, "save", "2026-01-02T00:00:00Z"),
        ("d", 2, 1, "skip", "2026-01-02T11:59:59.999999Z"),
        ("e", 1, 3, "click", "2026-01-02T12:00:00Z"),
        ("f", 1, 2, "hide", "2026-01-02T23:59:59.999999Z"),
    ],
    "2026-01-03": [("g", 2, 2, "conversion", "2026-01-03T00:00:00Z")],
}
# item 3 appears at noon on Jan 2, item 4 exactly at midnight Jan 3, item 2 has no known creation time.
ITEMS_CREATED = {1: "2025-12-01T00:00:00Z", 2: None, 3: "2026-01-02T12:00:00Z", 4: "2026-01-03T00:00:00Z",
                 5: "2026-01-05T00:00:00Z"}
JAN = {d: datetime(2026, 1, d, tzinfo=UTC) for d in range(1, 32)}


def _events_df(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [r[0] for r in rows],
            "user_id": [r[1] for r in rows],
            "item_id": [r[2] for r in rows],
            "action": [r[3] for r in rows],
            # Parsed here: contract.conform infers one strptime format from the first string and would reject
            # the mix of second and microsecond precision below.
            "ts": pd.to_datetime([r[4] for r in rows], format="ISO8601", utc=True),
            "surface": ["homefeed"] * len(rows),
            "context_item_id": [None] * len(rows),
            "query": [None] * len(rows),
        }
    )


def _write_source(root: Path, events: dict[str, list[tuple]] = EVENTS) -> Path:
    sink = ParquetSink(str(root))
    for day, rows in events.items():
        sink.write_events_day(date.fromisoformat(day), _events_df(rows))
    sink.write_users(pd.DataFrame({"user_id": [1, 2, 3], "signup_ts": ["2025-06-01"] * 3,
                                   "country": ["fr", "us", "br"]}))
    sink.write_items(pd.DataFrame({"item_id": list(ITEMS_CREATED), "category": ["x", "y", "x", "z", "y"],
                                   "genres": [None] * 5, "title": list("ABCDE"),
                                   "created_ts": list(ITEMS_CREATED.values())}))
    return root


def _write_raw_partition(root: Path, day: str, df: pd.DataFrame) -> Path:
    """A partition file written around the sink (which would refuse it), as a foreign producer might."""
    path = root / "events" / f"dt={day}" / "part-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def _entries(snapshots: Path) -> list[str]:
    """Everything under the snapshots directory, hidden temporary directories included."""
    return sorted(p.name for p in snapshots.iterdir()) if snapshots.exists() else []


@pytest.fixture
def source(tmp_path: Path) -> ParquetSource:
    return ParquetSource(str(_write_source(tmp_path / "src")))


def test_window_at_midnight_includes_start_excludes_as_of(source, tmp_path):
    snap = extract(source, JAN[3], 2, tmp_path / "snaps")
    events = snap.events()
    assert events.event_id.tolist() == ["a", "b", "c", "d", "e", "f"]  # g sits exactly at as_of
    assert str(events.ts.dtype) == "datetime64[us, UTC]"
    assert snap.users().user_id.tolist() == [1, 2, 3]
    assert snap.items().item_id.tolist() == [1, 2, 3]  # 4 is created at as_of, 5 after; 2 has no created_ts
    assert snap.snapshot_id.startswith("20260103-2d-") and len(snap.snapshot_id) == len("20260103-2d-") + 12
    assert snap.path == tmp_path / "snaps" / snap.snapshot_id
    assert sorted(p.name for p in snap.path.iterdir()) == ["events.parquet", "items.parquet", "manifest.json",
                                                           "users.parquet"]

    m = json.loads((snap.path / "manifest.json").read_text())
    assert m == snap.manifest
    assert m["snapshot_id"] == snap.snapshot_id and m["lookback_days"] == 2
    assert m["as_of"] == "2026-01-03T00:00:00+00:00"
    assert m["window"] == {"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-03T00:00:00+00:00"}
    assert m["source"]["uri"] == source.uri
    assert m["rows"] == {"events": 6, "users": 3, "items": 3}
    assert m["event_time_range"] == {"min": "2026-01-01T00:00:00+00:00", "max": "2026-01-02T23:59:59.999999+00:00"}
    assert m["actions"] == {"impression": 1, "click": 2, "save": 1, "conversion": 0, "skip": 1, "hide": 1}
    assert m["surfaces"] == {"homefeed": 6, "related": 0, "search": 0}
    assert m["events_per_day"] == {"2026-01-01": 2, "2026-01-02": 4}
    assert m["missing_days"] == []
    assert set(m["files"]) == {"events.parquet", "users.parquet", "items.parquet"}
    assert m["files"]["events.parquet"]["bytes"] == (snap.path / "events.parquet").stat().st_size
    assert {"created_at", "towerflow_version"} <= set(m)

    text = str(snap)
    assert snap.snapshot_id in text and str(snap.path) in text
    assert "events=6  users=3  items=3" in text
    assert "[2026-01-01T00:00:00+00:00, 2026-01-03T00:00:00+00:00)" in text


def test_window_boundaries_inside_a_day(source, tmp_path):
    # [Jan 1 12:00, Jan 2 12:00): b at the start is in, a before it and e at as_of are out.
    snap = extract(source, datetime(2026, 1, 2, 12, tzinfo=UTC), 1, tmp_path / "snaps")
    assert snap.events().event_id.tolist() == ["b", "c", "d"]
    assert snap.items().item_id.tolist() == [1, 2]  # item 3 is created exactly at as_of
    assert snap.snapshot_id.startswith("20260102T120000Z-1d-")
    assert snap.manifest["actions"]["skip"] == 1 and snap.manifest["rows"]["events"] == 3


def test_naive_as_of_is_utc(source, tmp_path):
    naive = extract(source, datetime(2026, 1, 3), 2, tmp_path / "snaps")
    aware = extract(source, JAN[3], 2, tmp_path / "snaps")
    assert naive == aware


def test_same_inputs_same_snapshot_not_rewritten(source, tmp_path):
    snaps = tmp_path / "snaps"
    first = extract(source, JAN[3], 2, snaps)
    stat = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [first.path, *first.path.iterdir()]}

    again = extract(ParquetSource(source.uri), JAN[3], 2, snaps)
    assert again.snapshot_id == first.snapshot_id and again.path == first.path
    assert again.manifest["created_at"] == first.manifest["created_at"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [again.path, *again.path.iterdir()]} == stat
    assert _entries(snaps) == [first.snapshot_id]


def test_id_depends_on_content_and_window_not_location(source, tmp_path):
    base = extract(source, JAN[3], 2, tmp_path / "snaps").snapshot_id

    copy = shutil.copytree(tmp_path / "src", tmp_path / "elsewhere")
    assert extract(ParquetSource(str(copy)), JAN[3], 2, tmp_path / "snaps2").snapshot_id == base

    # A new day outside the window changes nothing; a changed day inside it changes the id.
    sink = ParquetSink(str(copy))
    sink.write_events_day(date(2026, 1, 9), _events_df([("z", 1, 1, "click", "2026-01-09T08:00:00Z")]))
    assert extract(ParquetSource(str(copy)), JAN[3], 2, tmp_path / "snaps3").snapshot_id == base
    sink.write_events_day(date(2026, 1, 2), _events_df(EVENTS["2026-01-02"][:-1]))
    changed = extract(ParquetSource(str(copy)), JAN[3], 2, tmp_path / "snaps3")
    assert changed.snapshot_id != base and changed.manifest["rows"]["events"] == 5

    assert extract(source, JAN[3], 1, tmp_path / "snaps").snapshot_id.startswith("20260103-1d-")
    assert len(_entries(tmp_path / "snaps")) == 2


def test_tampered_snapshot_is_refused(source, tmp_path):
    snap = extract(source, JAN[3], 2, tmp_path / "snaps")
    target = snap.path / "events.parquet"
    target.chmod(0o644)  # snapshot files are read-only; a tamperer has to mean it
    pq.write_table(pq.read_table(target).slice(0, 5), target)

    with pytest.raises(SnapshotError, match=r"events.parquet was modified after extraction"):
        Snapshot.load(snap.path)
    # Re-extracting the same inputs must not silently paper over the modified snapshot.
    with pytest.raises(SnapshotError, match="delete the snapshot directory"):
        extract(source, JAN[3], 2, tmp_path / "snaps")
    assert len(Snapshot.load(snap.path, verify=False).events()) == 5


def test_load_rejects_a_directory_without_manifest(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(SnapshotError, match="no manifest.json"):
        Snapshot.load(tmp_path / "half")


def test_corrupt_partition_outside_window_is_never_read(tmp_path):
    root = _write_source(tmp_path / "src")
    bad = root / "events" / "dt=2026-01-03" / "part-00000.parquet"
    bad.write_bytes(b"not parquet at all")
    snaps = tmp_path / "snaps"

    snap = extract(ParquetSource(str(root)), JAN[3], 2, snaps)
    assert snap.manifest["rows"]["events"] == 6

    # Inside the window the same file fails, after Jan 1-2 were already streamed into the temporary directory.
    with pytest.raises(SourceError, match=r"dt=2026-01-03/part-00000.parquet: cannot read Parquet"):
        extract(ParquetSource(str(root)), JAN[4], 3, snaps)
    assert _entries(snaps) == [snap.snapshot_id]  # no partial snapshot, no temporary directory left


def test_empty_window_names_window_and_available_days(source, tmp_path):
    with pytest.raises(EmptyWindowError) as err:
        extract(source, JAN[31], 3, tmp_path / "snaps")
    assert str(err.value) == (
        f"no events in window [2026-01-28T00:00:00+00:00, 2026-01-31T00:00:00+00:00) of source {source.uri}; "
        "days available: 2026-01-01..2026-01-03 (3 days)"
    )
    assert _entries(tmp_path / "snaps") == []


def test_partition_with_no_rows_in_window_is_empty_and_leaves_nothing(tmp_path):
    # The only partition of the window holds an event stamped the day before: nothing falls inside [Jan 5, Jan 6).
    root = _write_source(tmp_path / "src", {"2026-01-05": [("x", 1, 1, "click", "2026-01-04T10:00:00Z")]})
    with pytest.raises(EmptyWindowError, match=r"days available: 2026-01-05; 1 row\(s\) of the window's partitions "
                                               r"have a ts outside their partition's day, e\.g\. \[\{'partition': "
                                               r"'dt=2026-01-05', 'event_id': 'x', 'ts': '2026-01-04T10:00:00\+00:00'"):
        extract(ParquetSource(str(root)), JAN[6], 1, tmp_path / "snaps")
    assert _entries(tmp_path / "snaps") == []


def test_partial_window_records_missing_days(source, tmp_path):
    snap = extract(source, JAN[5], 4, tmp_path / "snaps")  # Jan 1-4; Jan 4 has no partition
    assert snap.manifest["missing_days"] == ["2026-01-04"]
    assert snap.manifest["events_per_day"] == {"2026-01-01": 2, "2026-01-02": 4, "2026-01-03": 1}
    assert snap.items().item_id.tolist() == [1, 2, 3, 4]


def test_missing_source_path(tmp_path):
    with pytest.raises(SourceError, match=r"nope: path does not exist"):
        ParquetSource(str(tmp_path / "nope"))


def test_partition_without_required_column_names_the_file(tmp_path):
    root = _write_source(tmp_path / "src")
    _write_raw_partition(root, "2026-01-02", _events_df(EVENTS["2026-01-02"]).drop(columns=["surface"]))
    with pytest.raises(ContractError, match=r"events in .*dt=2026-01-02/part-00000.parquet: missing required "
                                            r"column\(s\) \['surface'\]"):
        extract(ParquetSource(str(root)), JAN[3], 2, tmp_path / "snaps")
    assert _entries(tmp_path / "snaps") == []


def test_users_without_required_column_names_the_file(tmp_path):
    root = _write_source(tmp_path / "src")
    pq.write_table(pa.table({"id": [1, 2]}), root / "users.parquet")
    with pytest.raises(ContractError, match=r"users in .*users.parquet: missing required column\(s\) "
                                            r"\['user_id', 'signup_ts'\]"):
        extract(ParquetSource(str(root)), JAN[3], 2, tmp_path / "snaps")
    assert _entries(tmp_path / "snaps") == []


def test_unparseable_timestamps_name_the_file(tmp_path):
    root = _write_source(tmp_path / "src")
    bad = _events_df(EVENTS["2026-01-02"]).assign(ts=["2026-01-02T01:00:00Z", "soon", "later", "never"])
    assert bad.ts.dtype == "str"
    _write_raw_partition(root, "2026-01-02", bad)
    with pytest.raises(ContractError, match=r"events.ts in .*dt=2026-01-02/part-00000.parquet: unparseable"):
        extract(ParquetSource(str(root)), JAN[3], 2, tmp_path / "snaps")
    assert _entries(tmp_path / "snaps") == []


def test_malformed_partition_name_is_named(tmp_path):
    root = _write_source(tmp_path / "src")
    (root / "events" / "dt=2026-13-01").mkdir()
    with pytest.raises(SourceError, match=r"dt=2026-13-01: partition name is not dt=YYYY-MM-DD"):
        extract(ParquetSource(str(root)), JAN[3], 2, tmp_path / "snaps")


@pytest.mark.parametrize("lookback", [0, -1])
def test_lookback_must_be_at_least_one_day(source, tmp_path, lookback):
    with pytest.raises(ExtractError, match=rf"lookback_days must be a whole number of days >= 1, got {lookback}"):
        extract(source, JAN[3], lookback, tmp_path / "snaps")


def test_cli_extract_prints_the_snapshot(source, data_root, capsys):
    rc = main(["data", "extract", "--as-of", "2026-01-03", "--lookback-days", "2", "--source", source.uri])
    out, err = capsys.readouterr()
    assert rc == 0
    (snap_dir,) = (data_root / "snapshots").iterdir()
    assert out.startswith(f"snapshot {snap_dir.name}\n") and "events=6  users=3  items=3" in out
    assert "extract [2026-01-01T00:00:00+00:00, 2026-01-03T00:00:00+00:00)" in err and " done in " in err


def test_cli_bad_input_is_one_error_line(source, data_root, tmp_path, capsys):
    rc = main(["data", "extract", "--as-of", "2026-03-01", "--lookback-days", "7", "--source", source.uri])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines()[-1] == (
        f"error: no events in window [2026-02-22T00:00:00+00:00, 2026-03-01T00:00:00+00:00) of source "
        f"{source.uri}; days available: 2026-01-01..2026-01-03 (3 days)"
    )
    assert "Traceback" not in err

    rc = main(["data", "extract", "--as-of", "2026-01-03", "--lookback-days", "2", "--source", str(tmp_path / "no")])
    assert rc == 1
    assert capsys.readouterr().err.strip() == f"error: source {tmp_path / 'no'}: path does not exist"
    assert _entries(data_root / "snapshots") == []


def test_losing_a_publish_race_keeps_the_winner(source, tmp_path):
    from towerflow.tasks.extract import _publish

    won = extract(source, JAN[3], 2, tmp_path / "snaps")
    inode = won.path.stat().st_ino
    late = tmp_path / "snaps" / f".{won.snapshot_id}.late.tmp"
    shutil.copytree(won.path, late)  # a second process finished the same snapshot a moment later

    assert _publish(late, won.path) == won
    assert won.path.stat().st_ino == inode and not late.exists()
    assert _entries(tmp_path / "snaps") == [won.snapshot_id]


def test_manifest_records_the_feedback_kind_and_it_is_part_of_the_id(source, tmp_path):
    snap = extract(source, JAN[3], 2, tmp_path / "snaps")
    assert snap.manifest["source"]["feedback"] == "explicit" and snap.feedback == "explicit"  # no source.json
    ParquetSink(source.uri).write_record("implicit")
    implicit = extract(ParquetSource(source.uri), JAN[3], 2, tmp_path / "snaps")
    assert implicit.snapshot_id != snap.snapshot_id and implicit.feedback == "implicit"


def test_rows_filed_under_another_day_are_counted_not_kept(tmp_path):
    # dt=2026-01-02 also holds a row stamped Jan 1 (inside the window) and one stamped 2030 (outside it)
    events = {**EVENTS, "2026-01-02": [*EVENTS["2026-01-02"], ("early", 1, 1, "click", "2026-01-01T05:00:00Z"),
                                       ("future", 2, 2, "click", "2030-01-02T00:00:00Z")]}
    snap = extract(ParquetSource(str(_write_source(tmp_path / "src", events))), JAN[4], 3, tmp_path / "snaps")
    assert snap.misplaced == {
        "rows": 2, "outside_window": 1, "by_day": {"2026-01-02": 2},
        "examples": [{"partition": "dt=2026-01-02", "event_id": "early", "ts": "2026-01-01T05:00:00+00:00"},
                     {"partition": "dt=2026-01-02", "event_id": "future", "ts": "2030-01-02T00:00:00+00:00"}],
    }
    assert snap.events().event_id.tolist() == ["a", "b", "c", "d", "e", "f", "g"]  # the 7 rows on their own day
    assert "  dropped  2 row(s) whose ts is not on their partition's day (the data gate fails on them)" in str(snap)
    assert snap.manifest["events_per_day"] == {"2026-01-01": 2, "2026-01-02": 4, "2026-01-03": 1}


def test_stale_temporary_snapshot_dirs_are_reaped_live_ones_kept(source, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from towerflow.procs import host_key
    from towerflow.tasks.extract import _owner, reap_stale_tmp

    snaps = tmp_path / "snaps"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    host, pid, start = _owner().rsplit("-", 2)
    assert (_owner(), int(pid), start != "") == (f"{host}-{pid}-{start}", os.getpid(), True)
    assert host.endswith(f"-{host_key()}")
    killed = snaps / f".20260103-2d-aaaaaaaaaaaa.{host}-{dead}-123.x1y2.tmp"  # its extract was killed
    reused = snaps / f".20260103-2d-eeeeeeeeeeee.{host}-{pid}-1.x1y2.tmp"  # a killed one whose pid is ours now
    live = snaps / f".20260103-2d-bbbbbbbbbbbb.{_owner()}.x1y2.tmp"  # this process: still writing
    hostname = host.rsplit("-", 1)[0]
    # same hostname, another container (PID namespace) or boot: its pid means nothing here, only the age counts;
    # so does a name from before the host key was recorded
    elsewhere = snaps / f".20260103-2d-ffffffffffff.{hostname}-000000000000-{dead}-123.x1y2.tmp"
    older_name = snaps / f".20260103-2d-999999999999.{hostname}-{dead}.x1y2.tmp"
    old, fresh = snaps / ".20260103-2d-cccccccccccc.q9.tmp", snaps / ".20260103-2d-dddddddddddd.q8.tmp"  # no owner
    for d in (killed, reused, live, elsewhere, older_name, old, fresh):
        d.mkdir(parents=True)
        (d / "events.parquet").write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    for p in (old, old / "events.parquet"):
        os.utime(p, (day_ago, day_ago))
    assert sorted(p.name for p in reap_stale_tmp(snaps)) == sorted([killed.name, reused.name, old.name])
    kept = [live.name, elsewhere.name, older_name.name, fresh.name]
    assert sorted(p.name for p in snaps.iterdir()) == sorted(kept)

    killed.mkdir()  # another kill: the next extract reaps it before writing its own snapshot
    snap = extract(source, JAN[3], 2, snaps)
    assert sorted(p.name for p in snaps.iterdir()) == sorted([snap.snapshot_id, *kept])
