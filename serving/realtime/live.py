"""What the service does with live events: ingest a batch, add a user's live actions to their history, compact.

``LiveEvents.ingest`` checks a batch (``events.check_events``: the data gate's rules, referential integrity against
the source's users and items tables) and appends it to the action store; once it returns, the events are durable
and the next ``/retrieve`` sees them. ``LiveEvents.actions`` is a user's live history actions after a time, as
``EventArrays``; ``merge`` adds them to the actions the service read from the source, so ``build_histories``
(tasks/history.py, the one definition) sees both.

Overlap: after a compaction and the service's next re-read of the source, a live action is also a source action;
``merge`` keeps one of two actions of a user with the same time, item and action (the source has no event ids in
``EventArrays``), so two distinct events identical in all three would count once here (and twice in training).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from towerflow.config import Settings
from towerflow.data.source import EventSource, SourceError
from towerflow.serving.realtime.compact import CompactionBusy, CompactResult, compact
from towerflow.serving.realtime.events import check_events
from towerflow.serving.realtime.store import ActionStore, ActionStoreError, SQLiteActionStore
from towerflow.tasks.history import ACTION_INDEX, HISTORY_ACTIONS, EventArrays

log = logging.getLogger("towerflow.serving.realtime")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # TOWERFLOW_REALTIME_URI of a store several hosts share


def open_action_store(settings: Settings) -> ActionStore:
    """The store ``settings`` name: Redis for ``realtime_uri`` redis://..., else SQLite at ``realtime_path``."""
    uri = settings.realtime_uri
    if uri is None or uri.startswith("sqlite:///"):
        return SQLiteActionStore(uri[len("sqlite:///"):] if uri else settings.realtime_path)
    if uri.startswith(REDIS_SCHEMES):
        from towerflow.serving.realtime.redis_store import RedisActionStore

        return RedisActionStore(uri)
    raise ActionStoreError(f"TOWERFLOW_REALTIME_URI {uri!r}: expected redis://host:port/db or sqlite:///path")


def shared_store(store: ActionStore | None) -> ActionStore | None:
    """``store`` when several hosts may share it (not the embedded SQLite file), else None: whose leases must
    guard what replicas write beside it (the source's items table)."""
    return None if store is None or isinstance(store, SQLiteActionStore) else store


def merge(offline: EventArrays, live: EventArrays) -> EventArrays:
    """Both sets of actions in time order, an action present in both (same user, ts, item, action) kept once."""
    if len(live) == 0:
        return offline
    if len(offline) == 0:
        return live
    key = np.stack([offline.user_id, offline.ts_us, offline.item_id, offline.action], axis=1)
    new = np.stack([live.user_id, live.ts_us, live.item_id, live.action], axis=1)
    known = {tuple(r) for r in key.tolist()}
    fresh = np.array([tuple(r) not in known for r in new.tolist()], dtype=bool)
    return offline.concat(live.take(fresh))


class KnownIds:
    """The ids of a source table (users or items), re-read at most every ``reload_s`` when an unknown id shows up."""

    def __init__(self, source: EventSource | None, table: str, reload_s: float = 10.0):
        self.source, self.table, self.reload_s = source, table, reload_s
        self._ids, self._read_at = np.zeros(0, dtype=np.int64), -float("inf")
        self._lock = threading.Lock()

    def _reload(self) -> None:
        df = self.source.read_users() if self.table == "users" else self.source.read_items()
        col = "user_id" if self.table == "users" else "item_id"
        self._ids, self._read_at = np.unique(df[col].to_numpy(dtype=np.int64)), time.monotonic()

    def add(self, ids: np.ndarray) -> None:
        """Ids just written to the table by this process (POST /items): known now, before the next re-read."""
        with self._lock:
            self._ids = np.union1d(self._ids, np.asarray(ids, dtype=np.int64))

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        with self._lock:
            ok = np.isin(ids, self._ids)
            if not ok.all() and time.monotonic() - self._read_at >= self.reload_s:
                self._reload()
                ok = np.isin(ids, self._ids)
            return ok


class LiveEvents:
    """The service's realtime side over one ``ActionStore`` (thread-safe: the store serializes its writes)."""

    def __init__(self, store: ActionStore, source: EventSource | None, *, max_skew_s: float = 5.0,
                 max_actions: int = 1000):
        self.store, self.source = store, source
        self.max_skew_s, self.max_actions = max_skew_s, max_actions
        self._users = KnownIds(source, "users") if source is not None else None
        self._items = KnownIds(source, "items") if source is not None else None
        self.last_compaction: dict[str, Any] | None = None

    def ingest(self, rows: Sequence[Mapping] | pd.DataFrame, where: str = "events") -> dict[str, int]:
        """Check and store a batch whole (EventBatchError / ConflictError name the bad row, nothing is stored)
        -> {accepted, duplicates, last_seq}; when it returns, the batch is durable and visible to retrieval."""
        try:
            events = check_events(rows, max_skew_s=self.max_skew_s, known_users=self._users,
                                  known_items=self._items, where=where)
        except SourceError as exc:  # the tables cannot be read: nothing is stored, the caller is told why
            raise SourceError(f"cannot check {where} against the source's tables: {exc}") from exc
        out = self.store.append(events)
        return {"accepted": out.accepted, "duplicates": out.duplicates, "last_seq": out.last_seq}

    def items_added(self, item_ids) -> None:
        """Items just added to the source's items table (live items): events may name them from now on."""
        if self._items is not None:
            self._items.add(item_ids)

    def actions(self, user_id: int, since_us: int | None = None) -> EventArrays:
        """The user's live history actions at or after ``since_us`` (their last ``max_actions``), in time order."""
        return self._arrays(self.store.recent(user_id, since_us, self.max_actions))

    def actions_many(self, user_ids: Sequence[int], since_us: int | None = None) -> dict[int, EventArrays]:
        """``actions`` of each of ``user_ids``, read from the store at once (a batch of requests: one read)."""
        return {u: self._arrays(records) for u, records in
                self.store.recent_many(user_ids, since_us, self.max_actions).items()}

    @staticmethod
    def _arrays(records: list) -> EventArrays:
        records = [r for r in records if r[3] in HISTORY_ACTIONS]
        if not records:
            return EventArrays.empty()
        records.sort(key=lambda r: (r[4], r[0]))  # (ts, event_id): EventArrays.from_events' order
        return EventArrays(user_id=np.array([r[1] for r in records], dtype=np.int64),
                           item_id=np.array([r[2] for r in records], dtype=np.int64),
                           action=np.array([ACTION_INDEX[r[3]] for r in records], dtype=np.int64),
                           ts_us=np.array([r[4] for r in records], dtype=np.int64))

    def compact(self, source_uri: str, prune_before_us: int | None = None) -> CompactResult | None:
        """Hand acknowledged events to the source (compact.py), then prune the store (store.py: of the compacted
        events, those beyond each user's last ``max_actions`` -- what a request reads -- or older than
        ``prune_before_us``); None when another compactor holds the lease."""
        try:
            result = compact(self.store, source_uri)
        except CompactionBusy as exc:
            log.info("%s", exc)
            return None
        pruned = self.store.prune(self.max_actions, prune_before_us)
        self.last_compaction = {"events": result.events, "files": len(result.files),
                                "high_water": result.high_water, "pruned": pruned, "at": time.time()}
        return result
