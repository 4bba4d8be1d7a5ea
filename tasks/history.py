"""THE definition of a user's history, shared by training examples, the refresh flow and the online service.

A user's history at request time ``t`` is their last ``max_seq_len`` non-impression actions (positive AND negative:
skip / hide enter as such, as in TransAct) on items the vocabulary knows, strictly before ``t`` and at most
``max_history_days`` old, left-padded with 0, the latest action in the last column. Impressions are left out: an
order of magnitude more numerous than actions, they carry no preference on their own and would push every real
action out of a short window. Seen-item exclusion uses the same actions (all of them, not only the last L).

Time features measure each action from the user's OWN latest action (``gap_bucket(latest - ts)``, so the latest
token is always bucket 1), never from the request time: a user who comes back after weeks gets the tokens their
history had when they left, the ones training saw. The request time only bounds the history (``max_history_days``).
Histories therefore do not depend on when they are computed, and a stored state stays exact until the user acts.

``build_examples`` calls ``history_window`` / ``history_tokens`` once per training target (request time = the
target's time); ``build_histories`` calls the same two per user at one ``as_of`` (the refresh flow and the
service's online path). ``HistorySpec`` is what a release records so serving rebuilds the same features.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from towerflow.config import ExamplesConfig
from towerflow.contract import (
    ACTIONS,
    NEGATIVE_ACTIONS,
    POSITIVE_ACTIONS,
    SURFACES,
    ContractError,
    check_columns,
)
from towerflow.errors import TowerflowError
from towerflow.tasks.vocabulary import Vocab, value_codes

ACTION_INDEX: dict[str, int] = {a: i + 1 for i, a in enumerate(ACTIONS)}  # 0 = padding (models/batch.py)
SURFACE_INDEX: dict[str, int] = {s: i for i, s in enumerate(SURFACES)}
HISTORY_ACTIONS: tuple[str, ...] = POSITIVE_ACTIONS + NEGATIVE_ACTIONS  # impressions excluded (module docstring)
HISTORY_CODES = np.array([ACTION_INDEX[a] for a in HISTORY_ACTIONS], dtype=np.int64)
GAP_REFERENCE = "latest_action"  # what token gaps are measured from; recorded in releases (HistorySpec)
_DAY_US = 86_400_000_000


class HistoryFormatError(TowerflowError):
    """A release does not record how its histories were built (it predates ``HistorySpec``): it cannot be served."""


@dataclass(frozen=True)
class HistorySpec:
    """Everything needed to rebuild a model's history features: stored with every release (``config.json``)."""

    max_seq_len: int
    gap_buckets: int
    max_history_days: int

    @classmethod
    def from_config(cls, config: ExamplesConfig) -> HistorySpec:
        return cls(config.max_seq_len, config.gap_buckets, config.max_history_days)

    @classmethod
    def from_release_config(cls, release_id: str, config: dict) -> HistorySpec:
        """The spec a release was trained with, from its ``config.json``; refuses releases that do not record it."""
        examples = (config or {}).get("examples", {})
        if examples.get("gap_reference") != GAP_REFERENCE or "max_history_days" not in examples:
            raise HistoryFormatError(
                f"release {release_id} was trained with time gaps measured from the request time (it records no "
                f"examples.gap_reference {GAP_REFERENCE!r} / max_history_days): its histories cannot be rebuilt "
                "as it was trained; retrain and promote a new release")
        return cls(int(examples["max_seq_len"]), int(examples["gap_buckets"]), int(examples["max_history_days"]))


def gap_bucket(gap_seconds: np.ndarray, n_buckets: int) -> np.ndarray:
    """Time-gap bucket of non-negative gaps in seconds: ``1 + floor(log2(1 + s) / 2)``, capped at n_buckets - 1.

    Two octaves per bucket: 1 = under 3 s, 2 = under 15 s, 4 = under 4 min, 6 = under 4.5 h, 8 = under 3 days,
    10 = under 48 days, ... Bucket 0 is padding. ``n_buckets`` must equal ``ModelConfig.gap_buckets``.
    """
    s = np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0.0)
    return (1 + np.minimum(np.floor(np.log2(1.0 + s) / 2.0), n_buckets - 2)).astype(np.int64)


def to_us(ts: datetime | pd.Timestamp | str) -> int:
    """A timestamp as UTC epoch microseconds (naive means UTC)."""
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return int(t.value) // 1000  # .value is nanoseconds whatever the unit


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us))


def action_codes(actions: pd.Series) -> np.ndarray:
    """ACTION_INDEX codes of contract actions; ContractError naming the values outside the contract."""
    codes = value_codes(actions, list(ACTIONS))
    if (codes == 0).any():
        bad = sorted(set(actions[codes == 0].astype(str)))
        raise ContractError(f"events.action: values outside {ACTIONS}: {bad[:5]}")
    return codes


# --------------------------------------------------------------------------------------------------- the definition


def history_window(group: np.ndarray, ts_us: np.ndarray, start: np.ndarray, end: np.ndarray, row_group: np.ndarray,
                   request_us: np.ndarray, max_history_days: int) -> np.ndarray:
    """The start of each row's history once actions older than ``max_history_days`` before its request are cut.

    History actions are laid out grouped by user (``group``, non-decreasing), each user's in time order; row r's
    candidate actions are ``[start[r], end[r])`` of its user ``row_group[r]``. Returns ``max(start, first action of
    that user at or after request_us - max_history_days)`` (at most ``end``), so ``[start', end)`` is the history.
    """
    if len(ts_us) == 0:
        return start
    # (group, time rank) sorts like the layout; one binary search answers every row at once
    distinct = np.unique(ts_us)
    width = np.int64(len(distinct) + 1)
    key = group.astype(np.int64) * width + np.searchsorted(distinct, ts_us)
    cutoff = np.asarray(request_us, dtype=np.int64) - np.int64(max_history_days) * _DAY_US
    first = np.searchsorted(key, row_group.astype(np.int64) * width + np.searchsorted(distinct, cutoff), side="left")
    return np.minimum(np.maximum(start, first), end)


def history_tokens(item: np.ndarray, action: np.ndarray, ts_us: np.ndarray, start: np.ndarray, end: np.ndarray,
                   max_seq_len: int, gap_buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, L) hist_items, hist_actions, hist_gaps of the rows' histories ``[start, end)`` (see history_window).

    The last L actions of each range, left-padded with 0; gaps are ``gap_bucket(latest - ts)`` with ``latest`` the
    range's last action (module docstring), 0 on padding.
    """
    n, L = len(start), max_seq_len
    if len(item) == 0:
        z = np.zeros((n, L), dtype=np.int64)
        return z, z.copy(), z.copy()
    pos = end[:, None] - L + np.arange(L)[None, :]  # (n, L), last column = latest
    real = pos >= start[:, None]
    src = np.clip(pos, 0, len(item) - 1)
    latest = ts_us[np.clip(end - 1, 0, len(item) - 1)]
    gaps = gap_bucket((latest[:, None] - ts_us[src]) / 1e6, gap_buckets)
    return (np.where(real, item[src], 0).astype(np.int64), np.where(real, action[src], 0).astype(np.int64),
            np.where(real, gaps, 0).astype(np.int64))


def history_ranges(hist: EventArrays, vocab: Vocab, user_id: np.ndarray, request_us: np.ndarray,
                   max_history_days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's history at its own request time, as ranges into one layout of the actions -> (item, action,
    ts_us, start, end): the known items' actions grouped by user (each user's in time order) and, per row,
    ``[start, end)`` = its user's actions strictly before ``request_us`` and at most ``max_history_days`` old
    (empty for a user without any). ``history_tokens`` over them gives the tokens.

    hist: history actions (``EventArrays.from_events``, time ordered); user_id, request_us: (n,).
    """
    item = vocab.item_index(hist.item_id)
    keep = item > 0  # as build_histories: actions on items the release does not know are not in the history
    by_user = np.argsort(hist.user_id[keep], kind="stable")  # stable: time order kept inside each user
    user, item = hist.user_id[keep][by_user], item[keep][by_user]
    action, ts = hist.action[keep][by_user], hist.ts_us[keep][by_user]
    if len(user) == 0:  # no history action at all (e.g. a log of impressions only)
        zero = np.zeros(len(user_id), dtype=np.int64)
        return item, action, ts, zero, zero.copy()
    start, end, group, row_group = user_ranges_before(user, ts, user_id, request_us)
    start = history_window(group, ts, start, end, row_group, request_us, max_history_days)
    return item, action, ts, start, end


def user_ranges_before(user: np.ndarray, ts_us: np.ndarray, user_id: np.ndarray, request_us: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For m actions grouped by user (``user`` sorted, each user's ``ts_us`` in time order; m >= 1) and n rows
    (``user_id``, ``request_us``) -> (start, end, group, row_group): ``[start, end)`` (n,) indexes the row's user's
    actions strictly before its request (empty for a user without actions); ``group`` (m,) and ``row_group`` (n,)
    number the users, as ``history_window`` takes them."""
    users, group = np.unique(user, return_inverse=True)
    # key = (user group, rank of ts among all times): "before request t" is one binary search per row
    times = np.unique(np.concatenate([ts_us, request_us]))
    width = np.int64(len(times) + 1)
    key = group.astype(np.int64) * width + np.searchsorted(times, ts_us)
    row_group = np.searchsorted(users, user_id)
    known = (row_group < len(users)) & (users[np.minimum(row_group, len(users) - 1)] == user_id)
    row_group = np.where(known, row_group, 0)
    start = np.searchsorted(key, row_group * width, side="left")
    end = np.searchsorted(key, row_group * width + np.searchsorted(times, request_us), side="left")  # strict
    return np.where(known, start, 0), np.where(known, end, 0), group, row_group


def histories_at(hist: EventArrays, vocab: Vocab, user_id: np.ndarray, request_us: np.ndarray,
                 spec: HistorySpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, L) hist_items, hist_actions, hist_gaps of each row's user strictly before its own ``request_us``: what
    ``build_histories`` gives that user at ``as_of_us = request_us`` (a row without history: all padding)."""
    item, action, ts, start, end = history_ranges(hist, vocab, user_id, request_us, spec.max_history_days)
    return history_tokens(item, action, ts, start, end, spec.max_seq_len, spec.gap_buckets)


# --------------------------------------------------------------------------------------------------- seen items


@dataclass
class SeenItems:
    """Per-row item indices (CSR): row r's items are ``indices[indptr[r]:indptr[r + 1]]``, sorted, unique."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int64

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.indptr[r] : self.indptr[r + 1]]

    @classmethod
    def from_lists(cls, rows: list) -> SeenItems:
        rows = [np.unique(np.asarray(r, dtype=np.int64)) for r in rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r) for r in rows])
        indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return cls(indptr, indices.astype(np.int64))

    @classmethod
    def from_ranges(cls, item: np.ndarray, start: np.ndarray, end: np.ndarray) -> SeenItems:
        """Row r: the distinct values of ``item[start[r]:end[r]]`` (non-negative ints)."""
        lengths = np.maximum(end - start, 0)
        rows = np.repeat(np.arange(len(start)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        items = item[np.repeat(start, lengths) + offsets]
        scale = np.int64(item.max(initial=0) + 1)
        pairs = np.unique(rows * scale + items)
        r, i = pairs // scale, pairs % scale
        indptr = np.zeros(len(start) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(np.bincount(r, minlength=len(start)))
        return cls(indptr, i.astype(np.int64))

    def take(self, idx) -> SeenItems:
        """The rows ``idx`` (an index array or boolean mask) as a new object."""
        idx = np.arange(len(self))[idx]
        lengths = self.indptr[idx + 1] - self.indptr[idx]
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(lengths)
        offsets = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)
        return SeenItems(indptr, self.indices[np.repeat(self.indptr[idx], lengths) + offsets])


def recent_distinct(items: np.ndarray, start: np.ndarray, end: np.ndarray, limit: int) -> list[np.ndarray]:
    """Per range [start, end) of time-ordered items: the distinct items, most recent first, at most ``limit``."""
    out = []
    for s, e in zip(start.tolist(), end.tolist(), strict=True):
        seg = items[s:e][::-1]
        _, first = np.unique(seg, return_index=True)
        out.append(seg[np.sort(first)][:limit].astype(np.int64))
    return out


# --------------------------------------------------------------------------------------------------- at one as_of


@dataclass
class EventArrays:
    """History actions (impressions dropped) with raw ids, sorted by (ts, event_id) as snapshots are.

    Raw ids, not indices: item indices belong to a release's vocabulary, and the same events must serve the old
    and the new release during a swap.
    """

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
        action = action_codes(events["action"])
        ts = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8
        keep = np.isin(action, HISTORY_CODES)
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

    def concat(self, other: EventArrays) -> EventArrays:
        """Both sets of actions, sorted by time (stable: ties keep self's before other's)."""
        both = EventArrays(**{f.name: np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                              for f in fields(self)})
        return both.take(np.argsort(both.ts_us, kind="stable"))


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


def build_histories(events: EventArrays, vocab: Vocab, as_of_us: int, spec: HistorySpec,
                    max_seen: int = 1000) -> Histories:
    """Histories at ``as_of_us`` of every user with at least one history action in them (module docstring).

    Each user's events must be in time order (``EventArrays.from_events`` sorts them all by time,
    ``RecentEvents.get`` returns them grouped by user, each in time order). Returns (m, L) arrays.
    """
    item_idx = vocab.item_index(events.item_id)
    keep = (events.ts_us < as_of_us) & (item_idx > 0)
    by_user = np.argsort(events.user_id[keep], kind="stable")  # stable: time order kept inside each user
    user = events.user_id[keep][by_user]
    items, raw = item_idx[keep][by_user], events.item_id[keep][by_user]
    action, ts = events.action[keep][by_user], events.ts_us[keep][by_user]

    uniq, start, group = np.unique(user, return_index=True, return_inverse=True)
    end = np.append(start[1:], len(user)).astype(np.int64)
    start = history_window(group, ts, start.astype(np.int64), end, np.arange(len(uniq)),
                           np.full(len(uniq), as_of_us, dtype=np.int64), spec.max_history_days)
    has = end > start  # users whose every action is older than max_history_days have no history
    uniq, start, end = uniq[has], start[has], end[has]
    hist_items, hist_actions, hist_gaps = history_tokens(items, action, ts, start, end, spec.max_seq_len,
                                                         spec.gap_buckets)
    return Histories(
        user_id=uniq.astype(np.int64), hist_items=hist_items, hist_actions=hist_actions, hist_gaps=hist_gaps,
        last_event_us=ts[end - 1] if len(end) else np.zeros(0, dtype=np.int64),
        seen=recent_distinct(raw, start, end, max_seen), as_of_us=int(as_of_us),
    )
