"""A lease: mutual exclusion that cannot outlive its holder.

One row in a small SQLite file (``<data_root>/locks/<name>.lease``) says who holds the lease (a random token, pid,
host, the pid's start time, a note), since when, and until when. The holder renews the deadline from a daemon
thread every ``lease_s / 4`` seconds while it is alive. A would-be holder takes the row when there is none, or
when the one there is dead:

- its deadline has passed (a holder that stopped renewing: crashed on another host, or hung hard), or
- it ran here and its process is gone (``kill -9``: freed at once, without waiting for the deadline); the pid's
  start time guards against a recycled pid. "Here" is the host identity (``towerflow.procs.host_identity``:
  hostname, boot id and PID namespace), not the hostname alone: containers sharing a hostname do not see each
  other's pids, so a holder in another one is freed only by its deadline.

A waiter says once what it waits for (holder, since when, the deadline), polls, and gives up after ``wait_s`` with
``LeaseTimeoutError`` naming the holder. Taking the row happens in one ``BEGIN IMMEDIATE`` transaction, so two
waiters never both take it. A holder whose lease was taken from it (it stopped renewing past its deadline) finds out
through ``Lease.check()``; the promotion calls it right before the one switch, and the compare-and-set on the alias
(infra/promote.py) catches the rest.

Nothing here knows about promotions or Prefect: ``infra/promote.py`` holds it around every alias flip and
``infra/release_gc.py`` around garbage collection.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from towerflow.errors import TowerflowError
from towerflow.procs import host_identity, process_alive, process_start

OnWait = Callable[[str], None] | None


class LeaseHeldError(TowerflowError):
    """The lease is held by a live holder and the caller would not wait (or gave up waiting)."""


class LeaseTimeoutError(LeaseHeldError):
    """Waited ``wait_s`` seconds for the lease; its holder is still alive and renewing."""


class LeaseLostError(TowerflowError):
    """This holder's lease expired and was taken by another (it stopped renewing for longer than ``lease_s``)."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Holder:
    """One row of the lease file."""

    token: str
    pid: int
    host: str
    start: str
    note: str
    since: float  # epoch seconds
    deadline: float  # epoch seconds; renewed while the holder lives
    host_id: str = ""  # towerflow.procs.host_identity() of the holder ('' in rows written before it was recorded)

    def describe(self) -> str:
        what = f" ({self.note})" if self.note else ""
        return f"pid {self.pid} on {self.host}{what} since {_iso(self.since)}"

    def dead(self, now: float) -> str | None:
        """Why this holder no longer holds the lease, or None while it does."""
        if now > self.deadline:
            return f"its lease expired at {_iso(self.deadline)}"
        if self.host_id == host_identity() and not process_alive(self.pid, self.start):
            return "its process is gone"
        return None


_COLUMNS = "token, pid, host, start, note, since, deadline, host_id"


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # explicit transactions only
    con.execute(f"CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY CHECK (id = 1), {_COLUMNS})")
    if "host_id" not in {row[1] for row in con.execute("PRAGMA table_info(lease)")}:  # a file from before host_id
        try:
            con.execute("ALTER TABLE lease ADD COLUMN host_id NOT NULL DEFAULT ''")
        except sqlite3.OperationalError as e:  # another process added it first
            if "duplicate column" not in str(e):
                raise
    return con


def read_holder(path: str | Path) -> Holder | None:
    """Whoever the lease file names (live or dead), or None."""
    path = Path(path)
    if not path.exists():
        return None
    with closing(_connect(path)) as con:
        row = con.execute(f"SELECT {_COLUMNS} FROM lease").fetchone()
    return Holder(*row) if row else None


def try_take(path: Path, me: Holder) -> tuple[Holder | None, str | None]:
    """Take the lease if it is free or its holder is dead: ``(None, why the previous one was broken)``; else
    ``(live holder, None)``."""
    with closing(_connect(path)) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            row = con.execute(f"SELECT {_COLUMNS} FROM lease").fetchone()
            current = Holder(*row) if row else None
            broken = current.dead(time.time()) if current else None
            if current is not None and broken is None:
                con.execute("ROLLBACK")
                return current, None
            con.execute(f"INSERT OR REPLACE INTO lease (id, {_COLUMNS}) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (me.token, me.pid, me.host, me.start, me.note, me.since, me.deadline, me.host_id))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    return None, (f"broke the lease of {current.describe()}: {broken}" if current else None)


class Lease:
    """A held lease; ``check()`` raises ``LeaseLostError`` if another holder has taken it since."""

    def __init__(self, path: Path, holder: Holder, lease_s: float):
        self.path, self.holder, self.lease_s = path, holder, lease_s
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(target=self._renew, name=f"lease-{path.name}", daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                with closing(_connect(self.path)) as con:
                    n = con.execute("UPDATE lease SET deadline = ? WHERE token = ?",
                                    (time.time() + self.lease_s, self.holder.token)).rowcount
            except sqlite3.Error:
                continue  # busy or briefly unreadable: the next renewal tries again well before the deadline
            if n == 0:
                self._lost = True
                return

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless the file still names this holder (no row: another took it and let go)."""
        current = read_holder(self.path)
        if self._lost or current is None or current.token != self.holder.token:
            raise LeaseLostError(f"the lease {self.path} was taken from this holder ({self.holder.describe()}): "
                                 f"it was not renewed for {self.lease_s:.0f}s")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with closing(_connect(self.path)) as con:
            con.execute("DELETE FROM lease WHERE token = ?", (self.holder.token,))


@contextmanager
def lease(path: str | Path, *, note: str = "", lease_s: float = 60.0, wait_s: float = 0.0, on_wait: OnWait = None,
          poll_s: float = 0.25) -> Iterator[Lease]:
    """Hold the lease at ``path`` for the block; renewed every ``lease_s / 4`` s, released on exit.

    Waits up to ``wait_s`` seconds for a live holder (0: fail at once), telling ``on_wait`` what it waits for
    when it starts waiting, when the holder changes, and every 30 s. Raises ``LeaseHeldError`` (``wait_s`` 0) or
    ``LeaseTimeoutError`` naming the holder.
    """
    if lease_s <= 0 or wait_s < 0:
        raise ValueError(f"lease_s must be > 0 and wait_s >= 0 (got {lease_s}, {wait_s})")
    path = Path(path)
    pid = os.getpid()
    t0 = time.monotonic()
    told: tuple[str, float] | None = None
    while True:
        now = time.time()
        me = Holder(secrets.token_hex(8), pid, socket.gethostname(), process_start(pid), note, now, now + lease_s,
                    host_identity())
        current, broken = try_take(path, me)
        if current is None:
            break
        waited = time.monotonic() - t0
        if waited >= wait_s:
            if wait_s == 0:
                raise LeaseHeldError(f"{path} is held by {current.describe()}, renewed until "
                                     f"{_iso(current.deadline)}")
            raise LeaseTimeoutError(f"gave up after waiting {waited:.1f}s for {path}, held by {current.describe()} "
                                    f"and renewed until {_iso(current.deadline)}; a holder that died frees it by its "
                                    "deadline (at once when it ran on this host)")
        if on_wait is not None and (told is None or told[0] != current.token or waited - told[1] >= 30):
            on_wait(f"waiting for {path}: held by {current.describe()}, renewed until {_iso(current.deadline)}; "
                    f"waited {waited:.0f}s of {wait_s:.0f}s")
            told = (current.token, waited)
        time.sleep(min(poll_s, max(0.0, wait_s - waited)))
    if broken and on_wait is not None:
        on_wait(broken)
    held = Lease(path, me, lease_s)
    held._thread.start()
    try:
        yield held
    finally:
        held.release()
