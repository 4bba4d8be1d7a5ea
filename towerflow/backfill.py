"""Backfill bookkeeping: the days of a range, the ledger of days already done, and the run summary.

Pure of Prefect: ``flows/backfill.py`` chains the work; everything it decides with (what is done, what to skip, how
the summary reads) lives here and is tested without a server.

The ledger is a small SQLite file (``<data_root>/backfill/ledger.sqlite``) so concurrent backfills can record days
safely. A row says "for ``day`` with ``lookback_days``, this ``work`` finished"; it is written only after the day's
work succeeded, so a crash mid-day leaves the day to be done again. Work has levels: ``extract`` <
``retrain`` < ``retrain+promote``; a day done at a level counts as done for every lower level.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from towerflow.errors import TowerflowError

WORK_LEVELS: dict[str, int] = {"extract": 0, "retrain": 1, "retrain+promote": 2}
MAX_DAYS = 3660  # ten years: a larger range is a typo, not a backfill


class BackfillError(TowerflowError):
    """A backfill was asked for an impossible range, or some of its days failed (the message names them)."""


def days_between(start: date, end: date) -> list[date]:
    """Every day of the closed range ``[start, end]``; BackfillError when ``end`` is before ``start``."""
    if end < start:
        raise BackfillError(f"backfill range is empty: end {end} is before start {start}")
    n = (end - start).days + 1
    if n > MAX_DAYS:
        raise BackfillError(f"backfill range {start}..{end} has {n} days, more than {MAX_DAYS}")
    return [start + timedelta(days=i) for i in range(n)]


def work_name(retrain: bool, promote: bool) -> str:
    """What a day's run rebuilds: ``extract``, ``retrain`` or ``retrain+promote`` (promote needs retrain)."""
    if promote and not retrain:
        raise BackfillError("promote=True needs retrain=True: only a retrained model can be promoted")
    return "retrain+promote" if promote else ("retrain" if retrain else "extract")


class LedgerEntry(BaseModel):
    day: date
    work: str
    lookback_days: int
    snapshot_id: str | None = None
    release_id: str | None = None
    retrain_status: str | None = None
    flow_run_id: str | None = None
    finished_at: datetime


class Ledger:
    """Which (day, work, lookback_days) finished. Opens the file per call: safe across processes, nothing held."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30.0)
        con.execute(
            "CREATE TABLE IF NOT EXISTS done (day TEXT NOT NULL, work TEXT NOT NULL, lookback_days INTEGER NOT NULL,"
            " snapshot_id TEXT, release_id TEXT, retrain_status TEXT, flow_run_id TEXT, finished_at TEXT NOT NULL,"
            " PRIMARY KEY (day, work, lookback_days))"
        )
        return con

    def entries(self, day: date | None = None) -> list[LedgerEntry]:
        """Every recorded row (of one day, if given), oldest day first."""
        if not self.path.exists():
            return []
        sql = "SELECT day, work, lookback_days, snapshot_id, release_id, retrain_status, flow_run_id, finished_at FROM done"
        args: tuple = ()
        if day is not None:
            sql, args = sql + " WHERE day = ?", (day.isoformat(),)
        with closing(self._connect()) as con:
            rows = con.execute(sql + " ORDER BY day, work", args).fetchall()
        keys = list(LedgerEntry.model_fields)
        return [LedgerEntry(**dict(zip(keys, r, strict=True))) for r in rows]

    def done(self, day: date, work: str, lookback_days: int) -> LedgerEntry | None:
        """The entry that makes ``work`` on ``day`` already done (same lookback, same or higher level), if any."""
        level = WORK_LEVELS[work]
        covering = [e for e in self.entries(day)
                    if e.lookback_days == lookback_days and WORK_LEVELS.get(e.work, -1) >= level]
        return max(covering, key=lambda e: WORK_LEVELS[e.work]) if covering else None

    def record(self, entry: LedgerEntry) -> None:
        """Write (or, on a forced rerun, replace) the row for ``entry``'s day, work and lookback."""
        row = entry.model_dump(mode="json")
        with closing(self._connect()) as con, con:
            con.execute(
                "INSERT OR REPLACE INTO done (day, work, lookback_days, snapshot_id, release_id, retrain_status,"
                " flow_run_id, finished_at) VALUES (:day, :work, :lookback_days, :snapshot_id, :release_id,"
                " :retrain_status, :flow_run_id, :finished_at)",
                row,
            )


class DayOutcome(BaseModel):
    """What happened to one day of a backfill."""

    day: date
    status: Literal["ran", "skipped", "failed"]
    snapshot_id: str | None = None
    events: int | None = None
    release_id: str | None = None
    retrain_status: str | None = None
    error: str | None = None
    seconds: float = 0.0


class BackfillSummary(BaseModel):
    """The result of a backfill: one outcome per day of ``[start, end]``, in order."""

    start: date
    end: date
    work: str
    lookback_days: int
    force: bool
    days: list[DayOutcome]

    def of(self, status: str) -> list[date]:
        return [d.day for d in self.days if d.status == status]

    @property
    def ran(self) -> list[date]:
        return self.of("ran")

    @property
    def skipped(self) -> list[date]:
        return self.of("skipped")

    @property
    def failed(self) -> list[date]:
        return self.of("failed")

    def headline(self) -> str:
        return (f"backfill {self.start}..{self.end} ({self.work}, lookback {self.lookback_days}d"
                f"{', forced' if self.force else ''}): {len(self.ran)} ran, {len(self.skipped)} skipped, "
                f"{len(self.failed)} failed")

    def to_markdown(self) -> str:
        """A table a person reads in the Prefect UI: one row per day."""
        lines = [f"# Backfill {self.start} .. {self.end}", "", f"**{self.headline()}**", "",
                 "| day | status | snapshot | events | retrain | release | seconds | error |",
                 "| --- | --- | --- | --- | --- | --- | ---: | --- |"]
        for d in self.days:
            err = (d.error or "").replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {d.day} | {d.status} | {d.snapshot_id or ''} | {'' if d.events is None else d.events} "
                         f"| {d.retrain_status or ''} | {d.release_id or ''} | {d.seconds:.1f} | {err} |")
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """The same, for a terminal or a log."""
        rows = [self.headline()]
        for d in self.days:
            extra = " ".join(x for x in (d.snapshot_id, d.retrain_status, d.release_id) if x)
            err = f"  error: {d.error}" if d.error else ""
            rows.append(f"  {d.day}  {d.status:<7}  {d.seconds:6.1f}s  {extra}{err}")
        return "\n".join(rows)


def now_utc() -> datetime:
    return datetime.now(UTC)
