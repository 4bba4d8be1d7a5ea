"""The realtime action store: acknowledged live events, per user and in arrival order, behind one interface.

Every accepted event gets a sequence number (``seq``, increasing in arrival order). The store answers

- ``append(events)``: a checked batch (``events.check_events``) stored whole or not at all; idempotent by
  ``event_id`` (an event already stored is a duplicate, not a second event; the same id with other content is a
  ``ConflictError`` and nothing of the batch is stored). Returns when the batch is durable.
- ``recent(user_id, since_us, limit)``: that user's last ``limit`` actions at or after ``since_us`` (action, item,
  surface, context item, query, ts), oldest first: what serving adds to the offline state.
- ``read(first, last)``: the events with ``first <= seq <= last``, the log the hand-off to the source compacts
  (``compact.py``), and ``compaction_mark`` / ``set_compaction_mark`` / ``lock``: its high-water mark and lease.
- ``prune(keep_per_user, before_us)``: retention. Drops the events already compacted into the source (``seq <=``
  the high-water mark) that are beyond their user's last ``keep_per_user`` actions or older than ``before_us``;
  an event not yet compacted is never dropped (the store is its only copy until the hand-off). Serving reads a
  user's last ``ServingConfig.realtime_max_actions`` actions and builds histories from actions at most
  ``max_history_days`` old, so with those two as the limits a pruned event changes no answer. A pruned event's id
  is forgotten: sent again, it is stored again (and compaction leaves it out of the source, whose day partition
  already holds that id: ``compact.py``).

``SQLiteActionStore`` is the embedded default (``<data_root>/realtime.sqlite``, WAL, ``synchronous=FULL``: an
acknowledged event survives ``kill -9`` and power loss); ``redis_store.RedisActionStore`` is for several service
replicas (``TOWERFLOW_REALTIME_URI=redis://...``); ``live.open_action_store`` picks one from the settings.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from towerflow.contract import OPTIONAL_COLUMNS, conform
from towerflow.errors import TowerflowError
from towerflow.serving.sqlite_file import WalFile

FIELDS = ("event_id", "user_id", "item_id", "action", "ts_us", "surface", "context_item_id", "query", "request_id")
Record = tuple  # one event as FIELDS, ts as UTC epoch microseconds


class ActionStoreError(TowerflowError):
    """The action store cannot be opened or reached; the message names it."""


class ConflictError(TowerflowError):
    """An event id already stored (or twice in the batch) with other content; ``row`` is its row in the batch."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


@dataclass(frozen=True)
class AppendResult:
    accepted: int  # new events stored
    duplicates: int  # events already stored (same id, same content): acknowledged again, not stored twice
    last_seq: int  # the store's highest sequence number after this batch


@dataclass(frozen=True)
class CompactionMark:
    high_water: int  # every event with seq <= high_water is in the source
    pending: tuple[int, int] | None  # a range being written (files may exist): redo exactly it


def to_records(events: pd.DataFrame) -> list[Record]:
    """A conformed events frame -> records (FIELDS order)."""
    ts = pd.DatetimeIndex(events["ts"]).as_unit("us").asi8
    ctx = events["context_item_id"]
    ctx = np.where(ctx.isna().to_numpy(), None, ctx.to_numpy(dtype=np.int64, na_value=0)).tolist()

    def strings(col: str) -> list[str | None]:  # a nullable string column; an optional one may be absent
        values = events[col].tolist() if col in events.columns else [None] * len(events)
        return [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]

    # whole columns to Python lists first: iterating pandas (Arrow strings, masked ints) value by value cost more
    # than the SQLite insert
    return list(zip(events["event_id"].astype(str).tolist(), events["user_id"].to_numpy(dtype=np.int64).tolist(),
                    events["item_id"].to_numpy(dtype=np.int64).tolist(), events["action"].astype(str).tolist(),
                    ts.tolist(), events["surface"].astype(str).tolist(), ctx, strings("query"), strings("request_id"),
                    strict=True))


def to_frame(records: Sequence[Record]) -> pd.DataFrame:
    """Records -> a conformed events frame (contract columns and dtypes)."""
    df = pd.DataFrame.from_records(list(records), columns=list(FIELDS))
    df["ts"] = pd.to_datetime(df.pop("ts_us").astype("int64"), unit="us", utc=True)
    return without_empty_optional(conform(df, "events"))


def without_empty_optional(events: pd.DataFrame) -> pd.DataFrame:
    """``events`` without an optional column (``request_id``) that no row sets: frames, and the files compaction
    writes, have it only where events carry it, as a source does."""
    empty = [c for c in OPTIONAL_COLUMNS["events"] if c in events.columns and events[c].isna().all()]
    return events.drop(columns=empty) if empty else events


def encode(record: Record) -> str:
    """One record as canonical JSON (what Redis stores and compares); a null ``request_id`` is left out, so an event
    stored before the contract had it encodes as it did then."""
    d = dict(zip(FIELDS, record, strict=True))
    if d["request_id"] is None:
        del d["request_id"]
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


def decode(text: str | bytes) -> Record:
    d = json.loads(text)
    return tuple(d.get(f) for f in FIELDS)


@runtime_checkable
class ActionStore(Protocol):
    uri: str

    def append(self, events: pd.DataFrame) -> AppendResult: ...

    def recent(self, user_id: int, since_us: int | None = None, limit: int = 1000) -> list[Record]: ...

    def recent_many(self, user_ids: Sequence[int], since_us: int | None = None,
                    limit: int = 1000) -> dict[int, list[Record]]: ...

    def read(self, first: int, last: int) -> list[Record]: ...

    def last_seq(self) -> int: ...

    def compaction_mark(self) -> CompactionMark: ...

    def set_compaction_mark(self, mark: CompactionMark) -> None: ...

    def prune(self, keep_per_user: int, before_us: int | None = None) -> int: ...

    def lock(self, name: str, ttl_s: float) -> str | None: ...

    def unlock(self, name: str, token: str) -> None: ...

    def close(self) -> None: ...


@contextmanager
def held_lease(store: ActionStore, name: str, ttl_s: float = 60.0, wait_s: float = 30.0) -> Iterator[str]:
    """Hold ``store``'s lease ``name`` for the block, waiting up to ``wait_s`` for it -> its token.

    A lease in a store that several hosts share (Redis) excludes writers on every host, where a file lock excludes
    one host's only; it expires ``ttl_s`` after a holder died, so ``ttl_s`` must outlast the block (a holder past
    it is no longer alone). ActionStoreError when another holder keeps it past ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while (token := store.lock(name, ttl_s)) is None:
        if time.monotonic() > deadline:
            raise ActionStoreError(f"{name}: the lease in {store.uri} stayed held by another writer for {wait_s:g}s")
        time.sleep(0.01)
    try:
        yield token
    finally:
        store.unlock(name, token)


def conflict_message(event_id: str, row: int, stored: Record, new: Record) -> str:
    diff = [f"{f}: stored {a!r}, now {b!r}" for f, a, b in zip(FIELDS, stored, new, strict=True) if a != b]
    return f"events[{row}].event_id: {event_id!r} is already stored as a different event ({'; '.join(diff)})"


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        user_id INTEGER NOT NULL,
        item_id INTEGER NOT NULL,
        action TEXT NOT NULL,
        ts_us INTEGER NOT NULL,
        surface TEXT NOT NULL,
        context_item_id INTEGER,
        query TEXT,
        ingested_us INTEGER NOT NULL,
        request_id TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts_us)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_COLS = ", ".join(FIELDS)
_CHUNK = 500  # host parameters per IN (...) (older SQLite builds allow 999)
_USERS_PER_READ = 150  # recent_many: 3 host parameters a user, under 999; SQLite joins at most 500 SELECTs


class SQLiteActionStore:
    """The embedded store: one SQLite file in WAL mode; one connection per thread, writes serialized by SQLite."""

    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.path = Path(path)
        self.uri = f"sqlite:///{self.path}"
        self.timeout_s = timeout_s
        # Writers of this process take turns here rather than in SQLite: a connection that finds the database
        # locked sleeps in SQLite's busy handler (1, 2, 5, ... 100 ms steps), which made concurrent POST /events
        # wait tens of ms for a lock freed in 1. Other processes (the CLI, a compactor) still meet SQLite's lock.
        self._write_lock = threading.Lock()
        # FULL: the WAL is fsynced at each commit, so an acknowledged event is durable; explicit transactions only
        self._db = WalFile(self.path, _SCHEMA, what="realtime action store", error=ActionStoreError,
                           synchronous="FULL", autocommit=True, timeout_s=timeout_s)
        self._con = self._db.connection
        con = self._con()
        if "request_id" not in {row[1] for row in con.execute("PRAGMA table_info(events)")}:
            con.execute("ALTER TABLE events ADD COLUMN request_id TEXT")  # a store made before the contract had it

    def append(self, events: pd.DataFrame) -> AppendResult:
        records = to_records(events)
        con = self._con()
        with self._write_lock:
            return self._append(con, records)

    def _append(self, con: sqlite3.Connection, records: list[Record]) -> AppendResult:
        con.execute("BEGIN IMMEDIATE")  # one writer at a time: the id check and the insert see the same store
        try:
            stored: dict[str, Record] = {}
            ids = [r[0] for r in records]
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i:i + _CHUNK]
                for row in con.execute(f"SELECT {_COLS} FROM events WHERE event_id IN "
                                       f"({','.join('?' * len(chunk))})", chunk):
                    stored[row[0]] = tuple(row)
            new = []
            for row, rec in enumerate(records):
                old = stored.get(rec[0])
                if old is None:
                    new.append(rec)
                elif old != rec:
                    raise ConflictError(conflict_message(rec[0], row, old, rec), row)
            now = time.time_ns() // 1000
            con.executemany(f"INSERT INTO events ({_COLS}, ingested_us) VALUES ({', '.join('?' * (len(FIELDS) + 1))})",
                            [(*r, now) for r in new])
            last = self._last_seq(con)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return AppendResult(len(new), len(records) - len(new), int(last))

    def recent(self, user_id: int, since_us: int | None = None, limit: int = 1000) -> list[Record]:
        rows = self._con().execute(
            f"SELECT {_COLS} FROM events WHERE user_id = ? AND ts_us >= ? ORDER BY ts_us DESC, event_id DESC "
            "LIMIT ?", (int(user_id), -(2**63) if since_us is None else int(since_us), int(limit))).fetchall()
        return [tuple(r) for r in reversed(rows)]

    def recent_many(self, user_ids: Sequence[int], since_us: int | None = None,
                    limit: int = 1000) -> dict[int, list[Record]]:
        """``recent`` of each user (absent ones: []) in one statement per 150 users: the same LIMITed index seek
        per user, joined by UNION ALL, so a batch of requests pays one query's Python and SQLite overhead."""
        users = sorted({int(u) for u in user_ids})
        out: dict[int, list[Record]] = {u: [] for u in users}
        lo = -(2**63) if since_us is None else int(since_us)
        con = self._con()
        for i in range(0, len(users), _USERS_PER_READ):
            chunk = users[i:i + _USERS_PER_READ]
            one = (f"SELECT * FROM (SELECT {_COLS} FROM events WHERE user_id = ? AND ts_us >= ? "
                   "ORDER BY ts_us DESC, event_id DESC LIMIT ?)")
            for row in con.execute(" UNION ALL ".join([one] * len(chunk)),
                                   [v for u in chunk for v in (u, lo, int(limit))]):
                out[row[1]].append(tuple(row))
        for rows in out.values():
            rows.sort(key=lambda r: (r[4], r[0]))  # recent()'s order: oldest first (event ids are unique)
        return out

    def read(self, first: int, last: int) -> list[Record]:
        return [tuple(r) for r in self._con().execute(
            f"SELECT {_COLS} FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq", (int(first), int(last)))]

    def last_seq(self) -> int:
        return self._last_seq(self._con())

    @staticmethod
    def _last_seq(con: sqlite3.Connection) -> int:
        # AUTOINCREMENT's counter, not MAX(seq): the newest events may have been pruned, and seq never goes back
        row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return 0 if row is None else int(row[0])

    def count(self) -> int:
        (n,) = self._con().execute("SELECT COUNT(*) FROM events").fetchone()
        return int(n)

    def prune(self, keep_per_user: int, before_us: int | None = None) -> int:
        """Drop compacted events beyond each user's last ``keep_per_user`` or older than ``before_us`` (module
        docstring) -> how many were dropped."""
        if keep_per_user < 1:
            raise ValueError(f"keep_per_user must be >= 1, got {keep_per_user}")
        con = self._con()
        with self._write_lock:
            con.execute("BEGIN IMMEDIATE")
            try:
                high_water = mark_from_json(self._meta("compaction")).high_water
                # rank within the user in recent()'s order (newest first): what a read of the last N returns
                cur = con.execute(
                    "DELETE FROM events WHERE seq <= ? AND (ts_us < ? OR seq IN (SELECT seq FROM ("
                    "  SELECT seq, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY ts_us DESC, event_id DESC) AS n"
                    "  FROM events) WHERE n > ?))",
                    (high_water, -(2**63) if before_us is None else int(before_us), int(keep_per_user)))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return int(cur.rowcount)

    def _meta(self, key: str) -> str | None:
        row = self._con().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def compaction_mark(self) -> CompactionMark:
        return mark_from_json(self._meta("compaction"))

    def set_compaction_mark(self, mark: CompactionMark) -> None:
        self._con().execute("INSERT OR REPLACE INTO meta VALUES ('compaction', ?)", (mark_to_json(mark),))

    def lock(self, name: str, ttl_s: float) -> str | None:
        """A lease named ``name`` for ``ttl_s`` seconds: its token, or None while another holder's is live."""
        con, token, now = self._con(), uuid.uuid4().hex, time.time()
        con.execute("BEGIN IMMEDIATE")
        try:
            held = self._meta(f"lock:{name}")
            if held is not None and json.loads(held)["until"] > now:
                con.execute("ROLLBACK")
                return None
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (f"lock:{name}", json.dumps({"token": token, "until": now + ttl_s})))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return token

    def unlock(self, name: str, token: str) -> None:
        held = self._meta(f"lock:{name}")
        if held is not None and json.loads(held)["token"] == token:
            self._con().execute("DELETE FROM meta WHERE key = ?", (f"lock:{name}",))

    def close(self) -> None:
        self._db.close()


def mark_to_json(mark: CompactionMark) -> str:
    return json.dumps({"high_water": mark.high_water, "pending": list(mark.pending) if mark.pending else None})


def mark_from_json(text: str | bytes | None) -> CompactionMark:
    if text is None:
        return CompactionMark(0, None)
    d = json.loads(text)
    return CompactionMark(int(d["high_water"]), tuple(d["pending"]) if d.get("pending") else None)

