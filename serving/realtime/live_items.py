"""Live items: catalog items the served release was not built with, embedded by its item tower and retrievable now.

Where they come from: ``POST /items`` (``LiveItems.add``), and rows of the source's items table that the release's
vocabulary lacks (``LiveItems.sync``: at load, at each hot swap, at each re-read of recent events). Rows whose
``created_ts`` is after the serving clock (``ServingConfig.as_of``, else now) wait until they are posted, so a replay
of a past day sees each item from its creation on.

How they are served: each release gets a ``LiveIndex``, a small side index of its live items' vectors, searched by
exact inner product beside the release's FAISS index and merged by score (``serving/retrieval.py``'s ``search``
takes it as ``live``). The release's index file is never touched, so its checksums stay valid; the side index is
immutable and replaced whole on every add (copy-on-write), so a ``/retrieve`` running during an add searches the
old one or the new one, never half of one, and needs no lock. A hot swap re-embeds every live item the new release
does not hold with the new release's tower (``sync``) before the new release serves.

The hand-off to training: an added item is first written to the source's items table (``ParquetSink.write_items``,
the importer's writer: the table rewritten whole under a temporary name, then renamed), under a file lock so two
writers (threads, or services on one host) never lose each other's rows; the next retrain's snapshot takes it into
the catalog, and its release holds it (so it is not live any more there).

Validation (``check_items``): the data gate's rules for the items table, per row so that a refusal names the row:
only the contract's columns (``item_id``, ``category``, ``genres``, ``title``, ``created_ts``) and ``features``;
``item_id`` an integer in int64, not negative; ``category`` a non-empty string; ``genres`` (``|``-joined) and
``title`` strings or null; ``created_ts`` an ISO-8601 string or null, not in the future; ``features`` null or a list
of exactly the release's dense length of finite numbers (a release without dense features takes none); one item_id
once per batch (an identical repeat is one item). A category or genre the release has not seen is code 0, unknown.

Idempotent by ``item_id``: an item the items table already holds with the same fields is acknowledged as a duplicate
(and made live if the release lacks it); with other fields it is refused (409): a catalog row is not changed here.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerflow.contract import REQUIRED_COLUMNS, conform
from towerflow.data.source import EventSource, ParquetSink
from towerflow.infra.tracking import file_lock
from towerflow.serving.realtime.events import EventBatchError
from towerflow.serving.realtime.store import ActionStore, ConflictError, held_lease
from towerflow.tasks.embed_items import embed_new_items

log = logging.getLogger("towerflow.serving.realtime")
ITEMS_LEASE = "items-table"  # the shared store's lease that one items-table writer at a time holds
COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS["items"], "features")
INT64_MAX = 2**63 - 1


class ItemBatchError(EventBatchError):
    """A batch of items refused whole; ``row`` is the first bad row (0-based), None for the batch (HTTP 422)."""


# ------------------------------------------------------------------------------------------------ the side index


@dataclass(frozen=True)
class LiveIndex:
    """The live items of one release: ids (m,) int64 and their item tower vectors (m, d) float32. Immutable."""

    release_id: str
    item_ids: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def empty(cls, release_id: str, dim: int) -> LiveIndex:
        return cls(release_id, np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32))

    @cached_property
    def _order(self) -> np.ndarray:  # sorts item_ids; computed once per (immutable) index, on first lookup
        return np.argsort(self.item_ids, kind="stable")

    def rows(self, item_ids) -> np.ndarray:
        """(n,) item ids -> (n,) int64 rows of ``vectors`` holding them, -1 for ids that are not live here."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if len(self) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.item_ids, ids, sorter=self._order), len(self) - 1)
        rows = self._order[at]
        return np.where(self.item_ids[rows] == ids, rows, -1).astype(np.int64)

    def with_items(self, item_ids: np.ndarray, vectors: np.ndarray) -> LiveIndex:
        """A new index with these items added (an id already here keeps its old vector); self is unchanged."""
        new = ~np.isin(item_ids, self.item_ids)
        return LiveIndex(self.release_id, np.concatenate([self.item_ids, item_ids[new]]),
                         np.concatenate([self.vectors, vectors[new].astype(np.float32)]))

    def search(self, u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """u (b, d) -> (scores (b, k'), ids (b, k')) by exact inner product, best first; k' = min(k, m)."""
        k = min(k, len(self))
        scores = np.asarray(u, dtype=np.float32) @ self.vectors.T  # (b, m)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(self) else np.tile(np.arange(k), (len(u), 1))
        s = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, axis=1), self.item_ids[np.take_along_axis(top, order, axis=1)]

    def merge(self, u: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The release index's answer (scores, ids) (b, k0) merged with this index's top k for u (b, d), best first."""
        if len(self) == 0:
            return scores, ids
        s2, i2 = self.search(u, k)
        s, i = np.concatenate([scores, s2], axis=1), np.concatenate([ids, i2], axis=1)
        s = np.where(i >= 0, s, -np.inf)  # FAISS's "no result" slots (-1) go last
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


# ------------------------------------------------------------------------------------------------ validation


def _null(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT or v is pd.NA


def _row_error(where: str, i: int, col: str, v: object, what: str) -> ItemBatchError:
    shown = "null" if _null(v) else repr(v if not isinstance(v, np.generic) else v.item())
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ItemBatchError(f"{where}[{i}].{col}: {shown} {what}", i)


def _check_row(i: int, r: Any, dense_dim: int, limit: pd.Timestamp, where: str) -> dict:
    if not isinstance(r, Mapping):
        raise ItemBatchError(f"{where}[{i}]: an item is a JSON object, got {type(r).__name__}", i)
    extra = [k for k in r if k not in COLUMNS]
    if extra:
        raise ItemBatchError(f"{where}[{i}]: unknown field(s) {extra}; an item has {list(COLUMNS)}", i)
    out = {c: r.get(c) for c in COLUMNS}
    iid = out["item_id"]
    if isinstance(iid, bool) or not isinstance(iid, int | np.integer):
        raise _row_error(where, i, "item_id", iid, "is not an integer id" + (" (required)" if _null(iid) else ""))
    if not 0 <= int(iid) <= INT64_MAX:
        raise _row_error(where, i, "item_id", iid, "is not in [0, 2**63 - 1] (ids are not negative: FAISS answers "
                                                   "-1 for 'no result')")
    if not isinstance(out["category"], str) or not out["category"]:
        raise _row_error(where, i, "category", out["category"], "is not a non-empty string (required)")
    for col in ("genres", "title"):
        if not _null(out[col]) and not isinstance(out[col], str):
            raise _row_error(where, i, col, out[col], "is not a string or null" + (
                " ('|'-joined genres, e.g. \"drama|comedy\")" if col == "genres" else ""))
        out[col] = None if _null(out[col]) or out[col] == "" else out[col]
    ts = out["created_ts"]
    if not _null(ts):
        parsed = pd.to_datetime(ts, utc=True, format="ISO8601", errors="coerce") if isinstance(ts, str) else None
        if parsed is None or _null(parsed):
            raise _row_error(where, i, "created_ts", ts, "is not an ISO-8601 time or null")
        if parsed > limit:
            raise _row_error(where, i, "created_ts", ts, f"is in the future (after {limit.isoformat()})")
        out["created_ts"] = parsed
    else:
        out["created_ts"] = None
    feats = out["features"]
    if not _null(feats):
        if dense_dim == 0:
            raise _row_error(where, i, "features", feats, "given, but the served release has no dense features")
        ok = isinstance(feats, list | tuple) and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in feats)
        if not ok or len(feats) != dense_dim:
            n = f"{len(feats)} values" if isinstance(feats, list | tuple) else type(feats).__name__
            raise _row_error(where, i, "features", feats, f"is not a list of {dense_dim} finite numbers (the "
                                                          f"release's dense length); got {n}")
        out["features"] = np.asarray(feats, dtype=np.float32)  # the items table's list<float>
    else:
        out["features"] = None
    return out


def check_items(rows: Sequence[Mapping], *, dense_dim: int, now: datetime | None = None, max_skew_s: float = 5.0,
                where: str = "items") -> pd.DataFrame:
    """The batch as a conformed items frame (an identical repeat of an item collapsed), or ItemBatchError naming the
    first bad row and what is wrong (module docstring). ``dense_dim``: the served release's dense feature length."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict(orient="records")
    if len(rows) == 0:
        raise ItemBatchError(f"{where}: empty batch (nothing to add)")
    limit = pd.Timestamp(now or datetime.now(UTC)) + timedelta(seconds=max_skew_s)
    checked = [_check_row(i, r, dense_dim, limit, where) for i, r in enumerate(rows)]
    first: dict[int, int] = {}
    keep = []
    for i, r in enumerate(checked):
        j = first.setdefault(int(r["item_id"]), i)
        if j == i:
            keep.append(i)
        elif not same_item(r, checked[j]):
            raise ItemBatchError(f"{where}[{i}].item_id: {r['item_id']} names two different items in this batch "
                                 f"(rows {[j, i]})", i)
    df = pd.DataFrame({c: pd.Series([checked[i][c] for i in keep], dtype=object) for c in COLUMNS})
    if dense_dim == 0:
        df = df.drop(columns="features")
    df["created_ts"] = pd.to_datetime(df["created_ts"], utc=True)
    return conform(df, "items", where)


def same_item(a: Mapping, b: Mapping) -> bool:
    """Whether two item rows say the same thing (features within float32 rounding: JSON may shorten them)."""
    for col in ("category", "genres", "title"):
        if (None if _null(a.get(col)) else a.get(col)) != (None if _null(b.get(col)) else b.get(col)):
            return False
    ta, tb = a.get("created_ts"), b.get("created_ts")
    if _null(ta) != _null(tb) or (not _null(ta) and pd.Timestamp(ta) != pd.Timestamp(tb)):
        return False
    fa, fb = a.get("features"), b.get("features")
    fa = None if fa is None or (np.ndim(fa) == 0 and _null(fa)) else np.asarray(fa, dtype=np.float32)
    fb = None if fb is None or (np.ndim(fb) == 0 and _null(fb)) else np.asarray(fb, dtype=np.float32)
    if fa is None or fb is None:
        return fa is None and fb is None
    return fa.shape == fb.shape and bool(np.allclose(fa, fb, rtol=1e-6, atol=1e-7))


# ------------------------------------------------------------------------------------------------ the service's side


class LiveItems:
    """Live items of the releases a service holds (the current one and the one before a swap). Thread-safe: adds
    and syncs take one lock; searches read an immutable ``LiveIndex`` without one."""

    def __init__(self, source: EventSource | None, lock_path: str | Path, *, as_of: datetime | None = None,
                 max_items: int = 100_000, max_skew_s: float = 5.0, shared: ActionStore | None = None):
        self.source, self.lock_path, self.as_of, self.shared = source, Path(lock_path), as_of, shared
        self.max_items, self.max_skew_s = max_items, max_skew_s
        self._held: dict[str, tuple[Any, LiveIndex]] = {}  # release id -> (its bundle, its live index)
        self._posted: set[int] = set()  # ids added through this service: live whatever their created_ts
        self._lock = threading.Lock()

    def index(self, release_id: str) -> LiveIndex | None:
        """The live index of ``release_id`` (None: none held); lock-free, for the request path."""
        held = self._held.get(release_id)
        return None if held is None else held[1]

    def count(self, release_id: str) -> int:
        held = self._held.get(release_id)
        return 0 if held is None else len(held[1])

    def _clock(self) -> pd.Timestamp:
        t = self.as_of or datetime.now(UTC)
        return pd.Timestamp(t if t.tzinfo else t.replace(tzinfo=UTC))

    def _read_items(self) -> pd.DataFrame | None:
        return None if self.source is None else self.source.read_items()

    def sync(self, bundle, items: pd.DataFrame | None = None) -> LiveIndex:
        """Make ``bundle``'s release hold every live item: rows of the source's items table its vocabulary lacks,
        created by the serving clock or posted here, embedded by its tower (only those it does not hold yet)."""
        with self._lock:
            items = self._read_items() if items is None else items
            rid = bundle.release_id
            current = self.index(rid) or LiveIndex.empty(rid, int(bundle.release.item_vectors.shape[1]))
            if items is not None and len(items):
                ids = items["item_id"].to_numpy(dtype=np.int64)
                due = items["created_ts"].isna().to_numpy() | (items["created_ts"] <= self._clock()).to_numpy()
                want = (bundle.item_index(ids) == 0) & (due | np.isin(ids, list(self._posted)))
                want &= ~np.isin(ids, current.item_ids)
                current = self._embed(bundle, current, items[want])
            self._held = {**{k: v for k, v in self._held.items() if k != rid}, rid: (bundle, current)}
            if len(self._held) > 2:  # the current release and the one before it: requests may still be on it
                self._held = dict(list(self._held.items())[-2:])
            return current

    def _embed(self, bundle, current: LiveIndex, rows: pd.DataFrame) -> LiveIndex:
        if len(rows) == 0:
            return current
        vecs = embed_new_items(bundle.release.model.item_tower, bundle.vocab, rows.reset_index(drop=True))
        log.info("release %s: %d live items embedded (%d in all)", bundle.release_id, len(rows),
                 len(current) + len(rows))
        return current.with_items(rows["item_id"].to_numpy(dtype=np.int64), vecs)

    def add(self, rows: Sequence[Mapping], bundle, where: str = "items") -> dict[str, int]:
        """Check a batch (ItemBatchError names the bad row), write its new items to the source's items table, and
        make them live for every release held -> {accepted, duplicates, live_items}. Nothing is written or made
        live unless the whole batch is good; ConflictError (409) for an item_id the table holds as another item."""
        if self.source is None:
            raise ItemBatchError(f"{where}: no event source: there is no items table to add items to")
        dense_dim = int(bundle.release.model.sizes.dense_dim)
        batch = check_items(rows, dense_dim=dense_dim, max_skew_s=self.max_skew_s, where=where)
        with self._lock:
            live_now = max((len(ix) for _, ix in self._held.values()), default=0)

            def room(n_new: int) -> None:
                if live_now + n_new > self.max_items:
                    raise ItemBatchError(f"{where}: {live_now} live items plus {n_new} new would pass "
                                         f"ServingConfig.live_items_max={self.max_items}; retrain to fold them in")

            new = append_items(self.source, batch, self.lock_path, where, before_write=room, shared=self.shared)
            self._posted.update(int(i) for i in batch["item_id"])
            for rid, (b, ix) in list(self._held.items()):
                want = (b.item_index(batch["item_id"].to_numpy(dtype=np.int64)) == 0) & ~np.isin(
                    batch["item_id"].to_numpy(dtype=np.int64), ix.item_ids)
                self._held = {**self._held, rid: (b, self._embed(b, ix, batch[want]))}
        return {"accepted": int(new.sum()), "duplicates": int((~new).sum()),
                "live_items": self.count(bundle.release_id)}


def append_items(source: EventSource, batch: pd.DataFrame, lock_path: str | Path, where: str = "items",
                 before_write: Callable[[int], None] | None = None, shared: ActionStore | None = None) -> np.ndarray:
    """Add the checked ``batch``'s items the source's items table lacks -> (n,) bool, True where written.

    One writer: under an exclusive file lock the table is read, compared and rewritten whole by
    ``ParquetSink.write_items`` (a temporary file renamed over it, as the importer writes it). An item_id the table
    holds with the same fields is left alone; with other fields the batch is refused (ConflictError naming the row)
    and nothing is written. ``before_write(n_new)`` may refuse the batch before anything is written.
    ``shared``: the action store that replicas on several hosts share (Redis); its lease ``ITEMS_LEASE`` is held
    as well, since the file lock excludes the writers of one host only.
    """
    with file_lock(lock_path, note="items table writer"), (
            nullcontext() if shared is None else held_lease(shared, ITEMS_LEASE)):
        table = source.read_items()
        by_id = {int(i): n for n, i in enumerate(table["item_id"].to_numpy(dtype=np.int64))}
        new = np.ones(len(batch), dtype=bool)
        for n, rec in enumerate(batch.to_dict(orient="records")):
            at = by_id.get(int(rec["item_id"]))
            if at is None:
                continue
            old = table.iloc[at].to_dict()
            if not same_item(rec, old):
                raise ConflictError(f"{where}[{n}].item_id: {rec['item_id']} is already in the source's items "
                                    f"table as another item ({_diff(rec, old)}); items are not changed here", n)
            new[n] = False
        if before_write is not None:
            before_write(int(new.sum()))
        if new.any():
            added = batch[new]
            if "features" in table.columns and "features" not in added.columns:
                added = added.assign(features=None)
            ParquetSink(source.uri).write_items(pd.concat([table, added], ignore_index=True))
    return new


def table_dense_dim(items: pd.DataFrame) -> int:
    """The dense feature length of an items table (0 without a ``features`` column or with every row null)."""
    if "features" not in items.columns:
        return 0
    present = items["features"].dropna()
    return int(len(present.iloc[0])) if len(present) else 0


def _diff(a: Mapping, b: Mapping) -> str:
    cols = [c for c in ("category", "genres", "title", "created_ts", "features") if not same_item(
        {c: a.get(c)}, {c: b.get(c)})]
    return "differs in " + ", ".join(cols) if cols else "differs"
