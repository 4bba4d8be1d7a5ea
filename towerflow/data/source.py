"""Event sources: where extraction reads the contract's tables from.

Layout of a Parquet source (a local path or any fsspec URL)::

    <root>/events/dt=YYYY-MM-DD/part-*.parquet
    <root>/users.parquet
    <root>/items.parquet
    <root>/source.json           optional: {"feedback": "explicit" | "ratings" | "implicit", "empty_days": [...]}
                                 (absent: explicit, no known empty days)

``EventSource`` is the adapter interface; ``ParquetSource`` reads only the day partitions inside a window.
``ParquetSink`` writes the same layout (the generator and the importers use it).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from towerflow.contract import (
    DEFAULT_FEEDBACK,
    EVENTS_SCHEMA,
    ContractError,
    arrow_schema,
    check_feedback,
    conform,
)

SOURCE_META = "source.json"


class SourceError(ContractError):
    """The source is missing, empty or unreadable; the message names the path."""


class EventSource(Protocol):
    uri: str

    def days(self) -> list[date]: ...

    def read_events(self, start: datetime, end: datetime) -> pd.DataFrame: ...

    def read_day(self, day: date) -> pd.DataFrame: ...

    def read_users(self) -> pd.DataFrame: ...

    def read_items(self) -> pd.DataFrame: ...

    def fingerprint(self, start: datetime, end: datetime) -> str: ...

    def feedback(self) -> str: ...

    def empty_days(self) -> list[date]: ...


def day_range(start: datetime, end: datetime) -> list[date]:
    """Calendar days (UTC) that intersect ``[start, end)``."""
    first, last = start.astimezone(UTC).date(), (end.astimezone(UTC) - timedelta(microseconds=1)).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


class ParquetSource:
    """Reads the contract's tables from a Parquet layout on a local path or fsspec URL."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        if not self.fs.exists(self.root):
            raise SourceError(f"source {self.uri}: path does not exist")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def days(self) -> list[date]:
        events = self._path("events")
        if not self.fs.exists(events):
            raise SourceError(f"source {self.uri}: no events/ directory")
        out = []
        for p in self.fs.ls(events, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("dt="):
                try:
                    out.append(date.fromisoformat(name[3:]))
                except ValueError as exc:
                    raise SourceError(f"{p}: partition name is not dt=YYYY-MM-DD ({exc})") from exc
        return sorted(out)

    def _day_files(self, day: date) -> list[str]:
        d = self._path("events", f"dt={day.isoformat()}")
        if not self.fs.exists(d):
            return []
        return sorted(p for p in self.fs.ls(d, detail=False) if p.endswith(".parquet"))

    def _read(self, path: str, table: str) -> pd.DataFrame:
        try:
            with self.fs.open(path, "rb") as f:
                df = pq.read_table(f).to_pandas()
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"{path}: cannot read Parquet ({exc})") from exc
        return conform(df, table, where=path)

    def read_day(self, day: date) -> pd.DataFrame:
        """Every row of partition ``dt=<day>`` as stored, including rows whose ``ts`` lies on another day."""
        frames = [self._read(p, "events") for p in self._day_files(day)]
        if not frames:
            return conform(EVENTS_SCHEMA.empty_table().to_pandas(), "events")
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def read_events(self, start: datetime, end: datetime) -> pd.DataFrame:
        """Events with ``start <= ts < end``, reading only the day partitions inside the window.

        A row filed under a day other than its ``ts`` is not returned (extract counts such rows for the data gate).
        """
        frames = [self._read(p, "events") for day in day_range(start, end) for p in self._day_files(day)]
        if not frames:
            return conform(EVENTS_SCHEMA.empty_table().to_pandas(), "events")
        df = pd.concat(frames, ignore_index=True)
        lo, hi = pd.Timestamp(start).tz_convert("UTC"), pd.Timestamp(end).tz_convert("UTC")
        return df[(df.ts >= lo) & (df.ts < hi)].reset_index(drop=True)

    def read_users(self) -> pd.DataFrame:
        return self._read(self._require("users.parquet"), "users")

    def read_items(self) -> pd.DataFrame:
        return self._read(self._require("items.parquet"), "items")

    def _require(self, name: str) -> str:
        p = self._path(name)
        if not self.fs.exists(p):
            raise SourceError(f"source {self.uri}: missing {name}")
        return p

    def _record(self) -> dict:
        p = self._path(SOURCE_META)
        if not self.fs.exists(p):
            return {}
        try:
            with self.fs.open(p, "rb") as f:
                record = json.loads(f.read())
            kind = record["feedback"]
            empty = [date.fromisoformat(d) for d in record.get("empty_days", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{p}: unreadable source record ({exc!r}); expected {{\"feedback\": ...}}") from exc
        return {"feedback": check_feedback(kind, where=p), "empty_days": empty}

    def feedback(self) -> str:
        """The feedback kind recorded in ``source.json`` (one of FEEDBACK_KINDS); ``explicit`` without the file."""
        return self._record().get("feedback", DEFAULT_FEEDBACK)

    def empty_days(self) -> list[date]:
        """Days the importer found without events between the data's first and last day (``source.json``).

        A day listed here is a gap in the data as it was imported, not a lost partition: the data gate allows it.
        """
        return self._record().get("empty_days", [])

    def fingerprint(self, start: datetime, end: datetime) -> str:
        """A hash of what a window would read: partition file names, sizes and modification-free checksums.

        Hashing bytes (not mtimes) makes the same inputs give the same snapshot id wherever they were copied.
        ``source.json`` counts when present: the same events under another feedback kind are gated differently.
        """
        h = hashlib.sha256()
        files = [p for day in day_range(start, end) for p in self._day_files(day)]
        files += [self._require("users.parquet"), self._require("items.parquet")]
        files += [p for p in (self._path(SOURCE_META),) if self.fs.exists(p)]
        for p in files:
            h.update(p[len(self.root):].encode())
            with self.fs.open(p, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


class ParquetSink:
    """Writes the contract's layout. Partitions are written whole, via a temporary name, so readers never see half."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.fs.makedirs(self.root, exist_ok=True)

    def _write(self, df: pd.DataFrame, table: str, path: str) -> int:
        df = conform(df, table)
        t = pa.Table.from_pandas(df, schema=arrow_schema(df, table), preserve_index=False)
        tmp = path + ".tmp"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(t, f, compression="zstd")
        self.fs.mv(tmp, path)
        return len(df)

    def write_events_day(self, day: date, df: pd.DataFrame, part: int = 0, name: str | None = None) -> int:
        """Write ``events/dt=<day>/part-<part>.parquet`` (or ``<name>``, a file name ending .parquet), atomically."""
        d = f"{self.root}/events/dt={day.isoformat()}"
        self.fs.makedirs(d, exist_ok=True)
        return self._write(df, "events", f"{d}/{name or f'part-{part:05d}.parquet'}")

    def write_users(self, df: pd.DataFrame) -> int:
        return self._write(df, "users", f"{self.root}/users.parquet")

    def write_items(self, df: pd.DataFrame) -> int:
        return self._write(df, "items", f"{self.root}/items.parquet")

    def write_record(self, feedback: str, empty_days: list[date] | tuple[date, ...] = ()) -> None:
        """Write ``source.json``: the feedback kind and the days known to have no events (an import's gaps), which
        the data gate reads through the snapshot."""
        check_feedback(feedback)
        record = {"feedback": feedback, "empty_days": [d.isoformat() for d in sorted(empty_days)]}
        with self.fs.open(f"{self.root}/{SOURCE_META}", "w") as f:
            f.write(json.dumps(record) + "\n")
