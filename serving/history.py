"""User histories at a point in time, built exactly as tasks/build_examples.py builds them for training.

A history is the user's last L non-impression actions (positive and negative) strictly before ``as_of``, on
items the release's vocabulary knows, left-padded with 0, latest action in the last column; each action's time
gap is ``gap_bucket(as_of - ts)``. Ties in ``ts`` are ordered by event_id, as in snapshots. This is what a training
example whose target happens at ``as_of`` sees, so a state computed here is what the model was trained on.

The offline refresh (flows/refresh_user_states.py) and the online path of the service (serving/service.py)
both call ``build_histories``; events are kept with RAW ids (``EventArrays``), because item indices belong to
a release's vocabulary and the same events must serve the old and the new release during a swap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
import pandas as pd

from towerflow.contract import ContractError, check_columns
from towerflow.tasks.build_examples import ACTION_INDEX, HISTORY_ACTIONS, Vocab, gap_bucket

_HISTORY_CODES = np.array([ACTION_INDEX[a] for a in HISTORY_ACTIONS], dtype=np.int64)


def to_us(ts: datetime | pd.Timestamp | str) -> int:
    """A timestamp as UTC epoch microseconds (naive means UTC)."""
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return int(t.value) // 1000


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us))


@dataclass
class EventArrays:
    """History actions (impressions dropped) with raw ids, sorted by (ts, event_id) as snapshots are."""

    user_id: np.ndarray  # (n,) int64
    item_id: np.ndarray  # (n,) int64
    action: np.ndarray  # (n,) int64, ACTION_INDEX codes
    ts_us: np.ndarray  # (n,) int64 epoch microseconds

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def empty(cls) -> EventArrays:
        e = np.zeros(0, dtype=np.int64)
        return cls(e, e.copy(), e.copy(), e.copy())

    @classmethod
    def from_events(cls, events: pd.DataFrame) -> EventArrays:
        """Contract events -> their history actions. Raises ContractError on a missing column or unknown action."""
        check_columns(events, "events")
        action = pd.Categorical(events["action"].astype("str"), categories=list(ACTION_INDEX)).codes + 1
        if (action == 0).any():
            bad = sorted(set(events["action"][action == 0].astype(str)))
            raise ContractError(f"events.action: values outside {tuple(ACTION_INDEX)}: {bad[:5]}")
        ts = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8
        keep = np.isin(action, _HISTORY_CODES)
        # Same-ts ties ordered by event_id, as in the snapshots training reads (tasks/extract.py sorts them so),
        # whatever order the source's files hold them in.
        order = np.lexsort((events["event_id"].to_numpy(dtype=str)[keep], ts[keep]))
        return cls(
            user_id=events["user_id"].to_numpy(dtype=np.int64)[keep][order],
            item_id=events["item_id"].to_numpy(dtype=np.int64)[keep][order],
            action=action[keep].astype(np.int64)[order],
            ts_us=ts[keep][order],
        )

    def take(self, idx) -> EventArrays:
        return EventArrays(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


@dataclass
class Histories:
    """m users' histories at ``as_of_us``; rows follow ``user_id`` (sorted ascending)."""

    user_id: np.ndarray  # (m,) int64
    hist_items: np.ndarray  # (m, L) int64 item indices of the release vocabulary, 0 = padding
    hist_actions: np.ndarray  # (m, L) int64
    hist_gaps: np.ndarray  # (m, L) int64
    last_event_us: np.ndarray  # (m,) int64: the latest action that went into the history
    seen: list[np.ndarray]  # per user: distinct raw item ids acted on, most recent first, at most max_seen
    as_of_us: int

    def __len__(self) -> int:
        return len(self.user_id)


def item_index(vocab: Vocab, ids: np.ndarray) -> np.ndarray:
    """``vocab.item_index`` for int64 ids without nulls, by binary search (the request path calls it)."""
    ids = np.asarray(ids, dtype=np.int64)
    known = vocab.item_ids
    if len(known) == 0:
        return np.zeros(len(ids), dtype=np.int64)
    pos = np.searchsorted(known, ids)
    found = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == ids)
    return np.where(found, pos + 1, 0).astype(np.int64)


def build_histories(
    events: EventArrays,
    vocab: Vocab,
    as_of_us: int,
    max_seq_len: int,
    gap_buckets: int,
    max_seen: int = 200,
) -> Histories:
    """Histories of every user with at least one action on a known item strictly before ``as_of_us``.

    Each user's events must be in time order (``EventArrays.from_events`` sorts them all by time,
    ``RecentEvents.get`` returns them grouped by user, each in time order); only actions on items of ``vocab``
    count, as in build_examples. Returns (m, L) arrays with L = ``max_seq_len``.
    """
    item_idx = item_index(vocab, events.item_id)
    keep = (events.ts_us < as_of_us) & (item_idx > 0)
    by_user = np.argsort(events.user_id[keep], kind="stable")  # stable: time order kept inside each user
    user = events.user_id[keep][by_user]
    items, raw = item_idx[keep][by_user], events.item_id[keep][by_user]
    action, ts = events.action[keep][by_user], events.ts_us[keep][by_user]

    uniq, start = np.unique(user, return_index=True)
    end = np.append(start[1:], len(user)).astype(np.int64)[:len(start)]
    pos = end[:, None] - max_seq_len + np.arange(max_seq_len)[None, :]  # (m, L), last column = latest
    real = pos >= start[:, None]
    src = np.clip(pos, 0, max(len(user) - 1, 0))
    gaps = gap_bucket((as_of_us - ts[src]) / 1e6, gap_buckets) if len(user) else np.zeros_like(pos)
    return Histories(
        user_id=uniq.astype(np.int64),
        hist_items=np.where(real, items[src] if len(user) else 0, 0).astype(np.int64),
        hist_actions=np.where(real, action[src] if len(user) else 0, 0).astype(np.int64),
        hist_gaps=np.where(real, gaps, 0).astype(np.int64),
        last_event_us=ts[end - 1] if len(user) else np.zeros(0, dtype=np.int64),
        seen=_recent_distinct(raw, start, end, max_seen),
        as_of_us=int(as_of_us),
    )


def _recent_distinct(items: np.ndarray, start: np.ndarray, end: np.ndarray, limit: int) -> list[np.ndarray]:
    """Per user segment [start, end) of time-ordered items: distinct items, most recent first, at most limit."""
    out = []
    for s, e in zip(start.tolist(), end.tolist(), strict=True):
        seg = items[s:e][::-1]
        _, first = np.unique(seg, return_index=True)
        out.append(seg[np.sort(first)][:limit].astype(np.int64))
    return out


def source_horizon(days: list[date], now: datetime | None = None) -> datetime:
    """The data's "now": the end of the source's last day partition, or the wall clock if that is earlier.

    In production the last partition is today's, so this is the wall clock; replaying past (or synthetic) data, it
    is where the data ends, so time gaps look as they did when the events happened.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    if not days:
        return now
    end = datetime.combine(max(days) + timedelta(days=1), time.min, tzinfo=UTC)
    return min(now, end)
