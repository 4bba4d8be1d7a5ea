"""Offline user history states: the store interface and its local implementations.

A state is ``h = encode_history(...)`` of one user as one release's user tower computed it, tagged with that
release's id, the time of the last event it saw and the time its gaps were measured from (``as_of``), plus the
user's recently engaged items (for ``exclude_seen``). An ``h`` is meaningful only to the tower that made it, so
the store is keyed by (release_id, user_id) and ``get`` answers for ONE release: serving asks for the release it
serves, and a state of any other release is simply not returned (the service checks again, see service.py).

``UserStateStore`` is the interface (Redis, a feature store...); ``SQLiteUserStateStore`` is the local default
at ``Settings().user_states_path``; ``InMemoryUserStateStore`` serves tests and benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from towerflow.errors import TowerflowError
from towerflow.serving.history import from_us, to_us
from towerflow.serving.sqlite_file import WalFile


class StateStoreError(TowerflowError):
    """The user-state store cannot be opened or holds something that is not a state."""


@dataclass(frozen=True)
class UserState:
    user_id: int
    release_id: str
    h: np.ndarray  # (history_dim,) float32
    last_event_ts: datetime  # UTC: the latest action the history saw
    as_of: datetime  # UTC: the time the history's gaps were measured from
    seen_items: np.ndarray  # (s,) int64 raw item ids, most recent first

    def __post_init__(self) -> None:
        object.__setattr__(self, "h", np.ascontiguousarray(self.h, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "seen_items", np.asarray(self.seen_items, dtype=np.int64).reshape(-1))


@runtime_checkable
class UserStateStore(Protocol):
    def get(self, user_ids: Sequence[int], release_id: str) -> dict[int, UserState]:
        """The states of ``user_ids`` computed by release ``release_id`` (users without one are absent)."""
        ...

    def put(self, states: Iterable[UserState]) -> int:
        """Insert or replace states (key: release_id, user_id); returns how many were written."""
        ...


class InMemoryUserStateStore:
    """A dict keyed by (release_id, user_id); thread-safe for one writer and many readers."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, int], UserState] = {}

    def get(self, user_ids: Sequence[int], release_id: str) -> dict[int, UserState]:
        out = {}
        for u in user_ids:
            if (s := self._states.get((release_id, int(u)))) is not None:
                out[int(u)] = s
        return out

    def put(self, states: Iterable[UserState]) -> int:
        n = 0
        for s in states:
            self._states[(s.release_id, int(s.user_id))] = s
            n += 1
        return n


_SCHEMA = """
CREATE TABLE IF NOT EXISTS user_states (
    release_id TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    h BLOB NOT NULL,                 -- dim float32, little-endian
    last_event_us INTEGER NOT NULL,
    as_of_us INTEGER NOT NULL,
    seen BLOB NOT NULL,              -- int64 raw item ids, little-endian
    written_us INTEGER NOT NULL,
    PRIMARY KEY (release_id, user_id)
) WITHOUT ROWID
"""
_GET_CHUNK = 500  # SQLite's default limit on host parameters is 999 (older builds)


class SQLiteUserStateStore:
    """States in one SQLite file (WAL: the service reads while the hourly refresh writes).

    One connection per thread, opened lazily: SQLite connections must not cross threads, and the service answers
    requests from a thread pool.
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        # NORMAL: states are recomputed from the source by the next refresh, a power cut may lose the last ones
        self._db = WalFile(self.path, [_SCHEMA], what="user-state store", error=StateStoreError,
                           synchronous="NORMAL", autocommit=False, timeout_s=timeout_s)
        self._con = self._db.connection

    def get(self, user_ids: Sequence[int], release_id: str) -> dict[int, UserState]:
        ids = [int(u) for u in user_ids]
        out: dict[int, UserState] = {}
        con = self._con()
        for i in range(0, len(ids), _GET_CHUNK):
            chunk = ids[i:i + _GET_CHUNK]
            rows = con.execute(
                "SELECT user_id, dim, h, last_event_us, as_of_us, seen FROM user_states "
                f"WHERE release_id = ? AND user_id IN ({','.join('?' * len(chunk))})", [release_id, *chunk])
            for user_id, dim, h, last_us, as_of_us, seen in rows:
                vec = np.frombuffer(h, dtype="<f4")
                if vec.shape != (dim,):
                    raise StateStoreError(f"{self.path}: state of user {user_id} (release {release_id}) holds "
                                          f"{vec.size} floats, its row says {dim}")
                out[user_id] = UserState(user_id, release_id, vec, from_us(last_us), from_us(as_of_us),
                                         np.frombuffer(seen, dtype="<i8"))
        return out

    def put(self, states: Iterable[UserState]) -> int:
        now = time.time_ns() // 1000
        rows = [(s.release_id, int(s.user_id), int(s.h.size), s.h.astype("<f4").tobytes(), to_us(s.last_event_ts),
                 to_us(s.as_of), s.seen_items.astype("<i8").tobytes(), now) for s in states]
        con = self._con()
        with con:  # one transaction: a reader sees all of this refresh's states for a user batch or none
            con.executemany("INSERT OR REPLACE INTO user_states VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def last_as_of(self, release_id: str) -> datetime | None:
        """The latest ``as_of`` of any state of ``release_id`` (the last refresh that wrote one); None if none."""
        (us,) = self._con().execute("SELECT MAX(as_of_us) FROM user_states WHERE release_id = ?",
                                    [release_id]).fetchone()
        return None if us is None else from_us(us)

    def releases(self) -> dict[str, int]:
        """release id -> number of states held, newest written first."""
        rows = self._con().execute("SELECT release_id, COUNT(*), MAX(written_us) AS w FROM user_states "
                                   "GROUP BY release_id ORDER BY w DESC")
        return {rid: n for rid, n, _ in rows}

    def prune(self, keep: int) -> list[str]:
        """Drop the states of every release but the ``keep`` most recently written; returns the dropped ids.

        Keeping more than one lets a rollback find the previous champion's states still there.
        """
        dropped = list(self.releases())[keep:]
        con = self._con()
        with con:
            con.executemany("DELETE FROM user_states WHERE release_id = ?", [(r,) for r in dropped])
        return dropped

    def close(self) -> None:
        self._db.close()
