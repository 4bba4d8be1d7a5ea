"""Extraction: the window ``[as_of - lookback_days, as_of)`` of an event source becomes an immutable snapshot.

A snapshot is a directory ``<snapshots_dir>/<snapshot_id>/`` holding::

    events.parquet   events with start <= ts < end filed under their own day, sorted by (ts, event_id)
    users.parquet    every user
    items.parquet    items created before as_of, and items whose created_ts is unknown
    manifest.json    window, source (with its feedback kind), row counts, event time range, action counts,
                     sha256 of every file

The id is derived from the inputs' content (the window and the source's fingerprint of what the window reads),
so the same inputs give the same id wherever the source lives, and an existing snapshot is returned as it is,
never rewritten. A snapshot is built in a hidden temporary directory beside its target and renamed into place in
one step: a reader sees a whole snapshot or none, and a failure leaves nothing behind.

``extract`` is pure with respect to orchestration (no Prefect, no MLflow); the flow wraps it in a ``@task``.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import shutil
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import towerflow
from towerflow.contract import ACTIONS, DEFAULT_FEEDBACK, SURFACES, ContractError, arrow_schema, conform
from towerflow.data.source import EventSource, SourceError, day_range
from towerflow.errors import TowerflowError
from towerflow.procs import host_key, process_alive, process_start
from towerflow.progress import progress, say, step

# Bump when what a snapshot contains changes for the same inputs, so old ids are not mistaken for new content.
SNAPSHOT_FORMAT = 2  # 2: the manifest counts the rows not kept because their ts is not on their partition's day
TABLE_FILES = {"events": "events.parquet", "users": "users.parquet", "items": "items.parquet"}
MANIFEST = "manifest.json"
MISPLACED_EXAMPLES = 5
STALE_TMP_AGE_S = 24 * 3600  # a temporary snapshot dir whose owner cannot be checked is stale after a day unchanged
# .<snapshot id>.<hostname>-<host key>-<pid>-<start>.<random>.tmp (towerflow.procs: where the pid means something)
_TMP_NAME = re.compile(r"\.(?P<sid>[^.]+)\.(?P<host>[A-Za-z0-9-]+?)-(?P<key>[0-9a-f]{12})-(?P<pid>\d+)-(?P<start>\d*)"
                       r"\.[^.]+\.tmp")


class ExtractError(TowerflowError, ValueError):
    """The extraction was asked for something impossible (e.g. ``lookback_days < 1``)."""


class EmptyWindowError(SourceError):
    """The source has no events in the requested window; the message names the window and the days it has."""


class SnapshotError(TowerflowError):
    """A snapshot directory is incomplete or was modified after extraction; the message names the file."""


@dataclass(frozen=True)
class Snapshot:
    """An extracted, immutable snapshot. ``manifest`` is the parsed ``manifest.json``."""

    path: Path
    snapshot_id: str
    manifest: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Snapshot:
        """Open a snapshot directory; with ``verify`` check every file's size and sha256 against the manifest.

        Raises SnapshotError naming the file that is missing or differs.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise SnapshotError(f"snapshot {path}: no {MANIFEST} (not a snapshot, or an incomplete one)")
        try:
            manifest = json.loads(mpath.read_text())
            files: dict[str, dict] = manifest["files"]
            snapshot_id = manifest["snapshot_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"{mpath}: unreadable manifest ({exc!r})") from exc
        missing = [f for f in TABLE_FILES.values() if f not in files]
        if missing:
            raise SnapshotError(f"{mpath}: manifest lists no {missing}")
        if verify:
            for name, meta in files.items():
                fpath = path / name
                if not fpath.is_file():
                    raise SnapshotError(f"snapshot {snapshot_id}: {fpath} is missing")
                digest, size = _sha256(fpath)
                if digest != meta.get("sha256") or size != meta.get("bytes"):
                    raise SnapshotError(
                        f"snapshot {snapshot_id}: {fpath} was modified after extraction "
                        f"(sha256 {digest[:12]}, {size} bytes; manifest says {str(meta.get('sha256'))[:12]}, "
                        f"{meta.get('bytes')} bytes); delete the snapshot directory to extract it again"
                    )
        return cls(path=path, snapshot_id=snapshot_id, manifest=manifest)

    def _table(self, table: str) -> pd.DataFrame:
        fpath = self.path / TABLE_FILES[table]
        try:
            df = pq.read_table(fpath).to_pandas()
        except (OSError, pa.ArrowInvalid) as exc:
            raise SnapshotError(f"{fpath}: cannot read Parquet ({exc})") from exc
        return conform(df, table, where=str(fpath))

    def events(self) -> pd.DataFrame:
        """Events of the window in contract dtypes, sorted by (ts, event_id)."""
        return self._table("events")

    def users(self) -> pd.DataFrame:
        return self._table("users")

    def items(self) -> pd.DataFrame:
        return self._table("items")

    @property
    def misplaced(self) -> dict[str, Any]:
        """Rows of the window's partitions whose ``ts`` is not on their partition's day, so not in the snapshot:
        ``{"rows", "outside_window", "by_day", "examples"}`` (zeros for a snapshot extracted before format 2)."""
        return self.manifest.get("misplaced") or {"rows": 0, "outside_window": 0, "by_day": {}, "examples": []}

    @property
    def known_empty_days(self) -> list[str]:
        """Days of the window the source records as having no events (gaps in imported data), ISO dates."""
        return list(self.manifest["source"].get("empty_days", []))

    @property
    def feedback(self) -> str:
        """The source's feedback kind when extracted (``towerflow.contract.FEEDBACK_KINDS``)."""
        return self.manifest["source"].get("feedback", DEFAULT_FEEDBACK)

    @property
    def window(self) -> tuple[datetime, datetime]:
        w = self.manifest["window"]
        return datetime.fromisoformat(w["start"]), datetime.fromisoformat(w["end"])

    def __str__(self) -> str:
        m = self.manifest
        rows, tr = m["rows"], m["event_time_range"]
        start, end = self.window
        seen = {a: n for a, n in m["actions"].items() if n}
        return "\n".join(
            [
                f"snapshot {self.snapshot_id}",
                f"  path     {self.path}",
                f"  window   [{start.isoformat()}, {end.isoformat()})  ({m['lookback_days']} days)",
                f"  source   {m['source']['uri']}",
                f"  rows     events={rows['events']:,}  users={rows['users']:,}  items={rows['items']:,}",
                f"  events   {tr['min']} .. {tr['max']}",
                "  actions  " + "  ".join(f"{a}={n:,}" for a, n in seen.items()),
                *([f"  dropped  {self.misplaced['rows']:,} row(s) whose ts is not on their partition's day "
                   f"(the data gate fails on them): {self.misplaced['examples'][:2]}"] if self.misplaced["rows"] else []),
            ]
        )


def extract(source: EventSource, as_of: datetime, lookback_days: int, snapshots_dir: Path) -> Snapshot:
    """Snapshot the events of ``[as_of - lookback_days, as_of)`` (UTC) with all users and the items known at as_of.

    Only the day partitions inside the window are read. A naive ``as_of`` is taken as UTC. Returns the existing
    snapshot unchanged when these inputs were already extracted.

    Raises ExtractError (lookback_days < 1), EmptyWindowError (no events in the window), SourceError / ContractError
    (missing source, unreadable file, missing columns, unparseable timestamps), SnapshotError (an existing snapshot
    with this id was modified).
    """
    as_of = _utc(as_of)
    if isinstance(lookback_days, bool) or not isinstance(lookback_days, numbers.Integral) or lookback_days < 1:
        raise ExtractError(f"lookback_days must be a whole number of days >= 1, got {lookback_days!r}")
    lookback_days = int(lookback_days)
    start = as_of - timedelta(days=lookback_days)
    snapshots_dir = Path(snapshots_dir)
    window = f"[{start.isoformat()}, {as_of.isoformat()})"

    with step(f"extract {window} from {source.uri}") as info:
        days = day_range(start, as_of)
        available = source.days()
        present = [d for d in days if d in set(available)]
        if not present:
            raise _empty_window(source, window, available)
        absent = sorted(set(days) - set(present))
        if absent:
            known = set(source.empty_days())
            why = ("the source records them as empty in the data it imported" if set(absent) <= known else
                   "the data gate fails on them unless gates.max_empty_days allows")
            say(f"  warning: {len(absent)} of {len(days)} days in the window have no partition: {_days_text(absent)} "
                f"({why})")

        with step("  fingerprint the window's partitions"):
            fingerprint = source.fingerprint(start, as_of)
        sid = snapshot_id(as_of, lookback_days, fingerprint)
        target = snapshots_dir / sid
        if target.exists():
            snapshot = Snapshot.load(target)
            info["note"] = f"{sid} already extracted, reused"
            return snapshot

        snapshots_dir.mkdir(parents=True, exist_ok=True)
        reap_stale_tmp(snapshots_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sid}.{_owner()}.", suffix=".tmp", dir=snapshots_dir))
        try:
            manifest = {
                "snapshot_id": sid, "as_of": as_of.isoformat(), "lookback_days": lookback_days,
                "window": {"start": start.isoformat(), "end": as_of.isoformat()},
                "source": {"uri": source.uri, "fingerprint": fingerprint, "feedback": source.feedback(),
                           "empty_days": [d.isoformat() for d in source.empty_days() if d in set(days)]},
                "missing_days": [d.isoformat() for d in absent],
                **_build(source, tmp, start, as_of, present, window),
            }
            _finish(tmp, manifest)
            snapshot = _publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info["note"] = f"{sid}: {manifest['rows']['events']:,} events"
        return snapshot


def snapshot_id(as_of: datetime, lookback_days: int, fingerprint: str) -> str:
    """``<as_of>-<lookback>d-<12 hex>``: readable, and the hash covers the window and the source's content."""
    as_of = _utc(as_of)
    start = as_of - timedelta(days=lookback_days)
    key = json.dumps(
        {"format": SNAPSHOT_FORMAT, "start": start.isoformat(), "end": as_of.isoformat(), "source": fingerprint},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    midnight = as_of.time() == datetime.min.time()
    stamp = f"{as_of:%Y%m%d}" if midnight else f"{as_of:%Y%m%dT%H%M%S}Z"
    return f"{stamp}-{lookback_days}d-{digest}"


def _build(
    source: EventSource, tmp: Path, start: datetime, end: datetime, days: list[date], window: str
) -> dict[str, Any]:
    """Write the three tables into ``tmp`` and return the content part of the manifest."""
    with step("  events") as info:
        ev = _write_events(source, tmp / TABLE_FILES["events"], start, end, days)
        if ev["rows"] == 0:
            err = _empty_window(source, window, source.days())
            if ev["misplaced"]["rows"]:
                err = EmptyWindowError(f"{err}; {ev['misplaced']['rows']} row(s) of the window's partitions have a "
                                       f"ts outside their partition's day, e.g. {ev['misplaced']['examples'][:2]}")
            raise err
        info["note"] = f"{ev['rows']:,} rows"
    with step("  users and items") as info:
        users = source.read_users()
        items = source.read_items()
        # Items that did not exist yet at as_of must not be retrievable; an unknown creation time is kept.
        items = items[items.created_ts.isna() | (items.created_ts < pd.Timestamp(end))].reset_index(drop=True)
        _write_table(users, "users", tmp / TABLE_FILES["users"])
        _write_table(items, "items", tmp / TABLE_FILES["items"])
        info["note"] = f"{len(users):,} users, {len(items):,} items"
    return {
        "format": SNAPSHOT_FORMAT,
        "rows": {"events": ev["rows"], "users": len(users), "items": len(items)},
        "event_time_range": {"min": ev["min"], "max": ev["max"]},
        "actions": ev["actions"],
        "surfaces": ev["surfaces"],
        "events_per_day": ev["per_day"],
        "misplaced": ev["misplaced"],
    }


def _write_events(source: EventSource, path: Path, start: datetime, end: datetime, days: list[date]) -> dict:
    """Stream the window a day at a time into one Parquet file, so memory holds one day, not the window.

    Each partition is read whole: rows whose ``ts`` is not on the partition's day are not kept, but counted (with a
    few examples) for the data gate, as are those of them that also lie outside the window.
    """
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    actions: Counter[str] = Counter()
    surfaces: Counter[str] = Counter()
    per_day: dict[str, int] = {}
    misplaced: dict[str, Any] = {"rows": 0, "outside_window": 0, "by_day": {}, "examples": []}
    rows, tmin, tmax = 0, None, None
    lo_w, hi_w = pd.Timestamp(start), pd.Timestamp(end)
    try:
        for day in progress(days, desc="days"):
            day_start = pd.Timestamp(datetime.combine(day, datetime.min.time(), tzinfo=UTC))
            raw = source.read_day(day)
            off_day = (raw.ts < day_start) | (raw.ts >= day_start + pd.Timedelta(days=1))
            if off_day.any():
                _count_misplaced(misplaced, day, raw[off_day], lo_w, hi_w)
            df = raw[~off_day & (raw.ts >= lo_w) & (raw.ts < hi_w)]
            if df.empty:
                continue
            if schema is None:
                schema = arrow_schema(df, "events")
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            extra = [c for c in df.columns if c not in schema.names]
            if extra:
                raise ContractError(f"events of {day} in {source.uri}: columns {extra} not present on earlier days")
            table = pa.Table.from_pandas(df.reindex(columns=schema.names), schema=schema, preserve_index=False)
            # Arrow sorts strings far faster than pandas' lexsort; event_id breaks ties so the order is total.
            table = table.sort_by([("ts", "ascending"), ("event_id", "ascending")])
            writer.write_table(table)
            rows += table.num_rows
            actions.update(_value_counts(table["action"]))
            surfaces.update(_value_counts(table["surface"]))
            per_day[day.isoformat()] = table.num_rows
            tmin = table["ts"][0].as_py() if tmin is None else tmin
            tmax = table["ts"][-1].as_py()
    finally:
        if writer is not None:
            writer.close()
    order = list(ACTIONS) + sorted(set(actions) - set(ACTIONS))
    sorder = list(SURFACES) + sorted(set(surfaces) - set(SURFACES))
    return {
        "rows": rows,
        "min": tmin.isoformat() if tmin is not None else None,
        "max": tmax.isoformat() if tmax is not None else None,
        "actions": {a: actions.get(a, 0) for a in order},
        "surfaces": {s: surfaces.get(s, 0) for s in sorder},
        "per_day": per_day,
        "misplaced": misplaced,
    }


def _count_misplaced(misplaced: dict[str, Any], day: date, rows: pd.DataFrame, lo: pd.Timestamp,
                     hi: pd.Timestamp) -> None:
    """Add a partition's off-day rows to the running ``misplaced`` record (count, per day, first examples)."""
    misplaced["rows"] += len(rows)
    misplaced["outside_window"] += int(((rows.ts < lo) | (rows.ts >= hi)).sum())
    misplaced["by_day"][day.isoformat()] = len(rows)
    room = MISPLACED_EXAMPLES - len(misplaced["examples"])
    misplaced["examples"] += [{"partition": f"dt={day.isoformat()}", "event_id": str(e), "ts": t.isoformat()}
                              for e, t in zip(rows.event_id[:room], rows.ts[:room], strict=True)]


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    return {v["values"].as_py(): v["counts"].as_py() for v in pc.value_counts(column)}


def _write_table(df: pd.DataFrame, table: str, path: Path) -> None:
    try:
        t = pa.Table.from_pandas(df, schema=arrow_schema(df, table), preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ContractError(f"{table}: cannot be written to the snapshot ({exc})") from exc
    pq.write_table(t, path, compression="zstd")


def _finish(tmp: Path, manifest: dict[str, Any]) -> None:
    """Hash the tables, write the manifest last, make files read-only and flush them to disk before the rename."""
    files = {}
    for name in TABLE_FILES.values():
        digest, size = _sha256(tmp / name)
        files[name] = {"sha256": digest, "bytes": size}
    manifest["files"] = files
    manifest["created_at"] = datetime.now(UTC).isoformat()
    manifest["towerflow_version"] = towerflow.__version__
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        f.chmod(0o444)
    tmp.chmod(0o755)  # mkdtemp makes it 0o700; the published snapshot is readable like any other directory


def _publish(tmp: Path, target: Path) -> Snapshot:
    """Rename the finished directory into place; if a concurrent extraction won the race, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return Snapshot.load(target)
    return Snapshot.load(target, verify=False)


def _owner() -> str:
    """``<hostname>-<host key>-<pid>-<start>`` of this process, in the temporary directory's name so a reaper can
    tell if it is alive (``towerflow.procs``: the key names the hostname, boot and PID namespace together)."""
    pid = os.getpid()
    return f"{re.sub(r'[^A-Za-z0-9]', '-', socket.gethostname()) or 'host'}-{host_key()}-{pid}-{process_start(pid)}"


def reap_stale_tmp(snapshots_dir: Path, max_age_s: float = STALE_TMP_AGE_S, now: float | None = None) -> list[Path]:
    """Remove hidden ``.<id>.<owner>.*.tmp`` directories that a killed extract left; return what went.

    One is stale when its process is gone (same host identity: hostname, boot and PID namespace; the pid is not
    alive or was reused), or, when that cannot be told (another host or container on shared storage, or a name from
    before the owner was recorded), when nothing in it changed for ``max_age_s`` seconds. A live extract's
    directory is never touched.
    """
    now = time.time() if now is None else now
    key, removed = host_key(), []
    for d in Path(snapshots_dir).glob(".*.tmp"):
        if not d.is_dir():
            continue
        m = _TMP_NAME.fullmatch(d.name)
        if m and m["key"] == key:
            stale = not process_alive(int(m["pid"]), m["start"])
        else:
            newest = max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.iterdir())])
            stale = now - newest > max_age_s
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        say(f"  removed {len(removed)} stale temporary snapshot dir(s) of killed extracts: "
            f"{', '.join(p.name for p in removed[:3])}")
    return removed


def _empty_window(source: EventSource, window: str, available: list[date]) -> EmptyWindowError:
    return EmptyWindowError(
        f"no events in window {window} of source {source.uri}; days available: {_days_text(available)}"
    )


def _days_text(days: list[date]) -> str:
    """``2026-01-01..2026-01-14 (14 days)`` when contiguous, else the list (shortened)."""
    if not days:
        return "none"
    days = sorted(days)
    if (days[-1] - days[0]).days == len(days) - 1 and len(days) > 2:
        return f"{days[0]}..{days[-1]} ({len(days)} days)"
    shown = ", ".join(d.isoformat() for d in days[:10])
    return shown + (f", ... ({len(days)} days)" if len(days) > 10 else "")


def _utc(ts: datetime | date) -> datetime:
    if not isinstance(ts, datetime):
        if isinstance(ts, date):
            return datetime.combine(ts, datetime.min.time(), tzinfo=UTC)
        raise ExtractError(f"as_of must be a datetime, got {ts!r}")
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
