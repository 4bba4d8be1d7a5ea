"""The serving clock. Histories themselves are defined once, in tasks/history.py (``build_histories``), which
the refresh flow and the service's online path call; the names are re-exported here for the serving modules."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from towerflow.tasks.history import EventArrays, Histories, build_histories, from_us, to_us

__all__ = ["EventArrays", "Histories", "build_histories", "from_us", "source_horizon", "to_us"]


def source_horizon(days: list[date], now: datetime | None = None) -> datetime:
    """The data's "now": the end of the source's last day partition, or the wall clock if that is earlier.

    In production the last partition is today's, so this is the wall clock; replaying past (or synthetic) data, it
    is where the data ends, so the history window (``max_history_days``) is where it was when the events happened.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if not days:
        return now
    end = datetime.combine(max(days) + timedelta(days=1), time.min, tzinfo=UTC)
    return min(now, end)
