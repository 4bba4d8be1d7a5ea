"""The retrieval service without its HTTP layer: release watching and hot swap, the hybrid path, cold users.

Per request (``retrieve``): read the current ``ServingBundle`` ONCE; get the user's history state ``h`` for that
bundle's release (the stored one, or computed from recent events), ``combine`` it with the live context, search
the same release's index, drop items the user already engaged with, and name the release in the response.

Version handshake: a stored state is used only if it was computed by the release being served (the store is
asked for that release only, and the answer is checked again here); otherwise ``h`` is recomputed online from
recent events, or the user is answered as an unknown one, as ``ServingConfig.on_missing_state`` says.

Hot swap: a watcher thread re-reads the alias every ``poll_interval_s``; a new release is loaded, verified and
warmed up beside the old one, then ``self._bundle`` is replaced by one assignment. Requests that started on the
old bundle finish on it (they hold their own reference); the old one is freed when the last of them ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from towerflow.config import ExamplesConfig, Settings
from towerflow.contract import query_problem
from towerflow.data.source import EventSource, ParquetSource, SourceError
from towerflow.errors import TowerflowError
from towerflow.infra.releases import ReleaseNotFoundError, load_release, resolve_alias
from towerflow.models.query import encode_texts
from towerflow.serving.bundle import ServingBundle, UserProfiles, build_bundle
from towerflow.serving.config import ServingConfig
from towerflow.serving.cooccurrence import candidates as cooccurring
from towerflow.serving.cooccurrence import fit_for_release
from towerflow.serving.realtime.live import LiveEvents, merge, open_action_store, shared_store
from towerflow.serving.realtime.live_items import LiveItems
from towerflow.serving.realtime.store import ActionStore
from towerflow.serving.recent_events import RecentEvents
from towerflow.serving.recommend import TWO_TOWER, merge_candidates, rank, ranker_sequence
from towerflow.serving.retrieval import context_batch, encode_histories, search, user_vectors
from towerflow.serving.state_store import SQLiteUserStateStore, UserState, UserStateStore
from towerflow.serving.states import history_batch
from towerflow.tasks.history import SURFACE_INDEX, EventArrays, build_histories, to_us

log = logging.getLogger("towerflow.serving")
PATHS = ("state", "live", "online", "context", "popularity")  # how a response's user vector was obtained


class Query(NamedTuple):
    """One ``/retrieve`` request, as ``RetrievalService.retrieve_batch`` takes it."""

    user_id: int
    item_id: int | None = None
    surface: str = "homefeed"
    k: int = 10
    exclude_seen: bool = True
    query: str | None = None  # the search query (surface "search" only, at most MAX_QUERY_CHARS characters)


class RequestError(TowerflowError):
    """The request cannot be answered as asked (the HTTP layer answers 422 with this message)."""


class ServiceNotReady(TowerflowError):
    """No release is loaded yet (HTTP 503)."""


class NoRankerError(TowerflowError):
    """The served release has no ranker /recommend can use (HTTP 409): /retrieve still serves it."""


class RetrievalService:
    """Serves the release that ``config.alias`` points at; thread-safe for concurrent ``retrieve`` calls."""

    def __init__(self, settings: Settings, config: ServingConfig | None = None, *,
                 store: UserStateStore | None = None, source: EventSource | None = None,
                 use_default_store: bool = True, use_default_source: bool = True,
                 realtime: ActionStore | None = None):
        self.settings, self.config = settings, config or ServingConfig()
        if store is None and use_default_store and self.config.mode == "hybrid":
            store = SQLiteUserStateStore(settings.user_states_path)
        if source is None and use_default_source:
            try:
                source = ParquetSource(settings.source)
            except SourceError:
                log.warning("no event source at %s: no online histories, no profiles", settings.source)
        self.store, self.source = store, source
        if realtime is None and self.config.realtime:
            realtime = open_action_store(settings)
        self.live = None if realtime is None else LiveEvents(realtime, source, max_skew_s=self.config.max_clock_skew_s,
                                                             max_actions=self.config.realtime_max_actions)
        # items the served release lacks, embedded by its tower and searched beside its index (live_items.py)
        self.items = LiveItems(source, settings.data_root / "items-table.lock", as_of=self.config.as_of,
                               max_items=self.config.live_items_max, max_skew_s=self.config.max_clock_skew_s,
                               shared=shared_store(realtime)) if self.config.live_items else None
        self._compacted_at = time.monotonic()
        self._bundle: ServingBundle | None = None
        self._recent: RecentEvents | None = None
        self._events_loaded_at = 0.0
        self._client = None
        self._write_lock = threading.Lock()  # one writer (watcher or a direct poll) at a time
        self._failed: dict[int, float] = {}  # version -> monotonic time of its failed load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        self.last_error: dict[str, Any] | None = None
        self.mismatched_states = 0  # states of another release handed back by the store (and not used)

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def bundle(self) -> ServingBundle | None:
        return self._bundle

    def start(self, watch: bool = True) -> RetrievalService:
        """Load recent events and the current release (if any), then start the watcher thread."""
        self.reload_events()
        try:
            self.poll()
        except ReleaseNotFoundError as exc:
            log.warning("%s; serving 503 until a release is promoted", exc)
        if watch and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="release-watcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            try:
                if time.monotonic() - self._events_loaded_at >= self.config.events_reload_s:
                    self.reload_events()
                self._compact_if_due()
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one failure
                log.warning("release watcher: %s", exc)
                self.last_error = {"error": str(exc), "at": datetime.now(UTC).isoformat()}

    def _compact_if_due(self) -> None:
        every = self.config.compact_interval_s
        if self.live is None or self.source is None or every is None:
            return
        if time.monotonic() - self._compacted_at >= every:
            self._compacted_at = time.monotonic()
            self.live.compact(self.source.uri, prune_before_us=self._history_horizon_us())

    def _history_horizon_us(self) -> int | None:
        """The oldest action any history served now can hold: the source's as_of (a history's time is never
        earlier) minus the served release's ``max_history_days``; None before a release and events are loaded."""
        b, recent = self._bundle, self._recent
        if b is None or recent is None:
            return None
        return recent.as_of_us - b.history.max_history_days * 86_400 * 1_000_000

    def ingest(self, rows, where: str = "events") -> dict[str, int]:
        """Store a batch of live events (serving/realtime/live.py) -> {accepted, duplicates, last_seq}."""
        if self.live is None:
            raise RequestError("live events are off (ServingConfig.realtime is false)")
        return self.live.ingest(rows, where)

    @property
    def lookback_days(self) -> int:
        """Days of events kept for online histories: ``config.lookback_days``, by default the history's max age."""
        return self.config.lookback_days or ExamplesConfig().max_history_days

    def reload_events(self) -> None:
        """Re-read recent events and the users table; refresh the current bundle's profiles from it."""
        if self.source is None:
            return
        with self._write_lock:
            as_of = self.config.as_of
            if as_of is not None and as_of.tzinfo is None:
                as_of = as_of.replace(tzinfo=UTC)
            recent = RecentEvents.from_source(self.source, self.lookback_days, as_of)
            self._recent = recent
            self._events_loaded_at = time.monotonic()
            if (b := self._bundle) is not None:
                self._bundle = replace(b, profiles=UserProfiles.build(recent.users, b.vocab))
                self._sync_items(self._bundle)  # rows added to the source's items table since
            log.info("recent events: %d users, as of %s", len(recent), recent.as_of.isoformat())

    def poll(self) -> str | None:
        """One watcher step: if the alias moved, load the new release beside the current one and swap.

        Returns the new release id, or None when nothing changed. A release that fails to load leaves the
        current one serving (the error is kept in ``last_error``) and is retried after retry_failed_release_s.
        """
        from towerflow.infra.tracking import tracking_client

        with self._write_lock:
            self._client = self._client or tracking_client(self.settings)
            version = resolve_alias(self.settings, self.config.alias, self._client)
            current = self._bundle
            if current is not None and current.release.version == version:
                return None
            failed_at = self._failed.get(version)
            if failed_at is not None and time.monotonic() - failed_at < self.config.retry_failed_release_s:
                return None
            t0 = time.perf_counter()
            try:
                release = load_release(self.settings, self.config.alias)
                users = self._recent.users if self._recent is not None else None
                bundle = build_bundle(release, users)
                if release.ranker is not None and self.config.cooccurrence_candidates:
                    bundle = replace(bundle, cooccurrence=fit_for_release(release, bundle.vocab, self.settings))
            except Exception as exc:
                self._failed[version] = time.monotonic()
                self.last_error = {"version": version, "error": str(exc), "at": datetime.now(UTC).isoformat()}
                log.error("release version %s failed to load, still serving %s: %s", version,
                          current.release_id if current else "nothing", exc)
                if current is None:
                    raise
                return None
            self._sync_items(bundle)  # live items re-embedded by the new tower BEFORE it serves
            self._bundle = bundle  # THE swap: towers, index, vocabulary and profiles change together
            self.swaps += current is not None
            self._failed.pop(version, None)
            log.info("serving release %s (version %s) after %.2fs%s", bundle.release_id, bundle.release.version,
                     time.perf_counter() - t0, f"; was {current.release_id}" if current else "")
            return bundle.release_id

    # ------------------------------------------------------------------------------------------ requests

    def retrieve(self, user_id: int, item_id: int | None = None, surface: str = "homefeed", k: int = 10,
                 exclude_seen: bool = True, query: str | None = None) -> dict[str, Any]:
        """-> {release, version, path, items: [{item_id, score}]}; raises RequestError / ServiceNotReady."""
        (out,) = self.retrieve_batch([Query(user_id, item_id, surface, k, exclude_seen, query)])
        if isinstance(out, Exception):
            raise out
        return out

    def retrieve_batch(self, queries: Sequence[Query], bundle: ServingBundle | None = None,
                       user_vectors_out: dict[int, np.ndarray] | None = None) -> list[dict[str, Any] | RequestError]:
        """Answer requests together with ONE release: one state-store read, one ``combine``, one index search
        (per depth, ``retrieval.search``) for the batch. -> per query its response, or the RequestError it alone
        raised; raises ServiceNotReady before any release is loaded. A query's answer is the one it gets alone.
        ``bundle``: the release to use (``recommend`` passes the one its ranker comes from); default the current.
        ``user_vectors_out``: filled with ``{query position: u (d,)}``, the vector each query searched with (none on
        the popularity path): ``recommend``'s ranker reads the retrieval score ``u . v`` from it."""
        b = self._bundle if bundle is None else bundle  # read ONCE: every query of the batch uses this release only
        if b is None:
            raise ServiceNotReady(f"no release of alias {self.config.alias!r} is loaded yet")
        out: list[dict[str, Any] | RequestError] = [{}] * len(queries)
        context = b.item_index([0 if q.item_id is None else q.item_id for q in queries])
        live_ix = None if self.items is None else self.items.index(b.release_id)
        # a viewed item the release lacks may be a live one: its vector is its row of the live side index
        unknown = [i for i, q in enumerate(queries) if q.item_id is not None and context[i] == 0]
        live_ctx = {} if live_ix is None or not unknown else {i: r for i, r in zip(
            unknown, live_ix.rows([queries[i].item_id for i in unknown]).tolist(), strict=True) if r >= 0}
        ok = []
        for i, q in enumerate(queries):
            if not 1 <= q.k <= self.config.max_k:
                out[i] = RequestError(f"k must be between 1 and {self.config.max_k}, got {q.k}")
            elif q.surface not in SURFACE_INDEX:
                out[i] = RequestError(f"context.surface must be one of {sorted(SURFACE_INDEX)}, got {q.surface!r}")
            elif q.query is not None and (problem := query_problem(q.query, q.surface, "context.query")):
                out[i] = RequestError(problem)
            elif q.item_id is not None and context[i] == 0 and i not in live_ctx:
                out[i] = RequestError(f"context.item_id {q.item_id} is not in the catalog of release {b.release_id} "
                                      f"({b.vocab.n_items} items) nor one of its "
                                      f"{0 if live_ix is None else len(live_ix)} live items")
            else:
                ok.append(i)
        states = None
        if self.config.mode == "hybrid" and self.store is not None and ok:
            states = self.store.get(list({int(queries[i].user_id) for i in ok}), b.release_id)
        # the batch's live actions in one read (one query per request cost a tenth of the batch in process)
        live = self.live.actions_many([int(queries[i].user_id) for i in ok]) if self.live is not None and ok else {}
        model, near, paths, exclude = [], [], {}, {}  # model: (i, h); near: (i, the viewed item's vector)
        for i in ok:
            q = queries[i]
            h, seen, paths[i] = self._history(b, int(q.user_id), states, live.get(int(q.user_id)))
            exclude[i] = seen if q.exclude_seen else seen[:0]
            if q.item_id is not None:  # never answer "related to X" with X itself
                exclude[i] = np.append(exclude[i], np.int64(q.item_id))
            if h is not None:
                model.append((i, h))
            elif i in live_ctx:
                paths[i] = "context"  # an unknown user viewing a live item: its neighbours
                near.append((i, live_ix.vectors[live_ctx[i]]))
            elif q.item_id is not None and (row := b.item_row(int(q.item_id))) is not None:
                paths[i] = "context"  # an unknown user viewing an item: the item's neighbours in this release's index
                near.append((i, b.release.item_vectors[row]))
            else:
                paths[i] = "popularity"
                out[i] = self._popular(b, q.k, exclude[i])
        vectors = []
        if model:
            rows = [i for i, _ in model]
            users = np.array([queries[i].user_id for i in rows], dtype=np.int64)
            ctx = np.where([queries[i].item_id is None for i in rows], 0, context[rows]).astype(np.int64)
            ctx_vecs = b.item_table[torch.from_numpy(ctx)]  # (m, d); row 0: no viewed item
            for j, i in enumerate(rows):
                if i in live_ctx:  # index past the table (never looked up: its vector is given), > 0 for "viewed"
                    ctx[j], ctx_vecs[j] = len(b.item_table), torch.from_numpy(live_ix.vectors[live_ctx[i]])
            batch = context_batch(torch.from_numpy(ctx),
                                  torch.tensor([SURFACE_INDEX[queries[i].surface] for i in rows]),
                                  torch.from_numpy(b.profiles.of(users)),
                                  torch.from_numpy(encode_texts([queries[i].query for i in rows])))
            h = torch.from_numpy(np.stack([np.asarray(h, dtype=np.float32) for _, h in model]))  # (m, history_dim)
            vectors.append(user_vectors(b.release, batch, h, b.item_table, ctx_vecs, b.combine))
        if near:
            vectors.append(np.stack([np.asarray(v, dtype=np.float32) for _, v in near]))
        searched = [i for i, _ in model] + [i for i, _ in near]
        if searched and user_vectors_out is not None:
            user_vectors_out.update(zip(searched, np.concatenate(vectors), strict=True))
        if searched:
            found = search(b.release, np.concatenate(vectors), [queries[i].k for i in searched],
                           [exclude[i] for i in searched], live=live_ix)
            for i, res in zip(searched, found, strict=True):
                out[i] = res
        for i in ok:
            out[i] = {**out[i], "version": b.release.version, "path": paths[i]}
        return out

    @staticmethod
    def _popular(b: ServingBundle, k: int, exclude: np.ndarray) -> dict[str, Any]:
        """The release's k most popular items minus ``exclude`` (an unknown user with no context)."""
        depth = k + len(exclude)
        top = b.popular_ids[:depth]
        keep = np.flatnonzero(~np.isin(top, exclude))[:k]
        return {"release": b.release_id, "items": [{"item_id": i, "score": s} for i, s in zip(
            top[keep].tolist(), b.popular_scores[:depth][keep].tolist(), strict=True)]}

    def _history(self, b: ServingBundle, user_id: int, states: dict[int, UserState] | None = None,
                 live: EventArrays | None = None) -> tuple[np.ndarray | None, np.ndarray, str | None]:
        """(h (history_dim,) or None, seen item ids, path) for the release of ``b`` only. ``states``: the store's
        answer for a batch's users and ``b``'s release, already read (read here when None); ``live``: the user's
        live actions, already read (read here when None)."""
        none = np.zeros(0, dtype=np.int64)
        if live is None:
            live = self.live.actions(user_id) if self.live is not None else EventArrays.empty()
        if self.config.mode == "hybrid" and self.store is not None:
            state = (self.store.get([user_id], b.release_id) if states is None else states).get(user_id)
            if state is not None:
                if state.release_id == b.release_id and state.h.shape == (b.history_dim,):
                    # nothing after the state: it holds (to_us costs more than the rest of this path: skip it)
                    if len(live) == 0 or not (live.ts_us > to_us(state.last_event_ts)).any():
                        seen = np.concatenate([live.item_id[::-1], state.seen_items]) if len(live) else None
                        return state.h, state.seen_items if seen is None else seen, "state"
                    return self._encode_online(b, user_id, live)
                self.mismatched_states += 1  # a store that ignores the release key: never pair h with this tower
                log.warning("state of user %s from release %s (dim %d) not used with release %s", user_id,
                            state.release_id, state.h.size, b.release_id)
            if self.config.on_missing_state == "cold" and len(live) == 0:
                return None, none, None
        return self._encode_online(b, user_id, live)

    def _encode_online(self, b: ServingBundle, user_id: int,
                       live: EventArrays) -> tuple[np.ndarray | None, np.ndarray, str | None]:
        """h from the user's recent source actions plus their live ones (path "live" when there are any)."""
        none = np.zeros(0, dtype=np.int64)
        if self._recent is None and len(live) == 0:
            return None, none, None
        events, as_of_us = self._user_actions(user_id, live)
        hist = build_histories(events, b.vocab, as_of_us, b.history, self.config.max_seen)
        if len(hist) == 0:
            return None, np.unique(live.item_id), None
        h = encode_histories(b.release, history_batch(hist, [0]), b.item_table)[0].numpy()
        seen = hist.seen[0]
        if len(live) and len(unknown := live.item_id[b.item_index(live.item_id) == 0]):
            # live items (the release lacks them): no history token, but seen all the same
            seen = np.concatenate([np.unique(unknown), seen])
        return h, seen, "live" if len(live) else "online"

    def _user_actions(self, user_id: int, live: EventArrays) -> tuple[EventArrays, int]:
        """(the user's history actions, the request time): the source's recent actions plus the live ones (``live``,
        read from the action store), and the time the online path builds histories at (after all of them)."""
        recent = self._recent
        events = recent.get([user_id]) if recent is not None else EventArrays.empty()
        as_of_us = recent.as_of_us if recent is not None else 0
        if len(live):
            events, as_of_us = merge(events, live), max(as_of_us, int(live.ts_us.max()) + 1)
        return events, as_of_us

    def recommend(self, user_id: int, item_id: int | None = None, surface: str = "homefeed", k: int = 10,
                  candidates: int = 200, query: str | None = None) -> dict[str, Any]:
        """POST /recommend: the ``candidates`` best items ``retrieve`` gives (seen items excluded), ranked by the
        SAME release's ranker against the user's ranker sequence (recent + live actions, serving/recommend.py)
        -> {release, version, path, items: [{item_id, score, heads, sources}]}, the top ``k``.

        Raises RequestError (422: what ``retrieve`` refuses, candidates or k out of range), NoRankerError (409: the
        release has no ranker serving can run), ServiceNotReady (503)."""
        b = self._bundle  # read ONCE: its index retrieves and its ranker ranks, whatever swaps meanwhile
        if b is None:
            raise ServiceNotReady(f"no release of alias {self.config.alias!r} is loaded yet")
        ranker = b.release.ranker
        if ranker is None:
            raise NoRankerError(f"release {b.release_id} (version {b.release.version}) has no ranker: POST /recommend "
                                "needs a release trained with the ranking stage; POST /retrieve serves this one")
        if ranker.dense_dim:
            raise NoRankerError(f"the ranker of release {b.release_id} takes {ranker.dense_dim} dense request "
                                "features that serving does not compute: POST /retrieve serves this release")
        if not 1 <= candidates <= self.config.max_k:
            raise RequestError(f"candidates must be between 1 and {self.config.max_k}, got {candidates}")
        if not 1 <= k <= candidates:
            raise RequestError(f"k must be between 1 and candidates ({candidates}), got {k}")
        u: dict[int, np.ndarray] = {}
        (found,) = self.retrieve_batch([Query(user_id, item_id, surface, candidates, True, query)], bundle=b,
                                       user_vectors_out=u)
        if isinstance(found, Exception):
            raise found
        live = self.live.actions(user_id) if self.live is not None else EventArrays.empty()
        actions, as_of_us = self._user_actions(user_id, live)
        generators = {TWO_TOWER: found["items"]}
        if b.cooccurrence is not None and self.config.cooccurrence_candidates:
            hist = build_histories(actions, b.vocab, as_of_us, b.history, self.config.max_seen)
            row = (hist.hist_items[0], hist.hist_actions[0]) if len(hist) else (np.zeros(1, np.int64),) * 2
            exclude = np.concatenate([hist.seen[0] if len(hist) else np.zeros(0, np.int64), live.item_id,
                                      [] if item_id is None else [item_id]]).astype(np.int64)
            context = 0 if item_id is None else int(b.item_index([item_id])[0])
            generators["cooccurrence"] = cooccurring(b.cooccurrence, b.vocab, *row, context,
                                                     self.config.cooccurrence_candidates, exclude)
        cands = merge_candidates(generators)
        seq = ranker_sequence(actions, b.vocab, user_id, as_of_us, ranker.cfg.max_seq_len,
                              b.history.max_history_days)
        # the ranker's item rows are the vocabulary's indices (checked when the bundle was built)
        # the retrieval score's u: the vector the index was searched with (zeros on the popularity path: none)
        user_vector = u.get(0, np.zeros(b.item_table.shape[1], np.float32)) if ranker.cfg.retrieval_score else None
        items = rank(ranker, cands, b.item_index(cands.item_ids), SURFACE_INDEX[surface], seq, k,
                     user_vector=user_vector)
        return {"release": b.release_id, "version": b.release.version, "path": found["path"], "items": items}

    def _sync_items(self, bundle: ServingBundle) -> None:
        """Bring ``bundle``'s live items up to date with the source's items table; a failure only logs (the
        release serves without the items it could not embed)."""
        if self.items is None:
            return
        try:
            self.items.sync(bundle)
        except Exception as exc:  # noqa: BLE001 - live items must never keep a release from serving
            log.warning("live items for release %s: %s", bundle.release_id, exc)
            self.last_error = {"error": f"live items: {exc}", "at": datetime.now(UTC).isoformat()}

    def add_items(self, rows, where: str = "items") -> dict[str, Any]:
        """POST /items: check a batch of catalog rows, write the new ones to the source's items table and make
        them retrievable now (serving/realtime/live_items.py) -> {accepted, duplicates, live_items, release}."""
        if self.items is None:
            raise RequestError("live items are off (ServingConfig.live_items is false)")
        b = self._bundle
        if b is None:
            raise ServiceNotReady(f"no release of alias {self.config.alias!r} is loaded yet: new items are "
                                  "embedded by its item tower")
        if self.items.index(b.release_id) is None:
            self.items.sync(b)
        out = self.items.add(rows, b, where)
        if self.live is not None:
            self.live.items_added([int(r["item_id"]) for r in rows if isinstance(r, dict)])
        return {**out, "release": b.release_id}

    def status(self) -> dict[str, Any]:
        b, recent = self._bundle, self._recent
        out: dict[str, Any] = {"alias": self.config.alias, "mode": self.config.mode,
                               "on_missing_state": self.config.on_missing_state, "swaps": self.swaps,
                               "mismatched_states": self.mismatched_states, "last_error": self.last_error,
                               "events_as_of": recent.as_of.isoformat() if recent else None,
                               "recent_users": len(recent) if recent else 0,
                               "realtime": None if self.live is None else {
                                   "store": self.live.store.uri.split("://", 1)[0],
                                   "last_seq": self.live.store.last_seq(),
                                   "compacted_through": self.live.store.compaction_mark().high_water,
                                   "last_compaction": self.live.last_compaction}}
        if b is not None:
            m = b.release.manifest
            out |= {"release": b.release_id, "version": b.release.version, "model_version": m.model_version,
                    "created_at": m.created_at, "snapshot_id": m.snapshot_id, "loaded_at": b.loaded_at.isoformat(),
                    "n_items": int(len(b.release.item_ids)), "dim": int(b.release.item_vectors.shape[1]),
                    "index": b.release.index_meta.get("kind", m.index.get("kind")),
                    "history_dim": b.history_dim, "max_seq_len": b.max_seq_len,
                    "ranker": b.release.ranker is not None, "cooccurrence_generator": b.cooccurrence is not None,
                    "combine": "eager" if b.combine is None else "traced",
                    "live_items": None if self.items is None else self.items.count(b.release_id),
                    "path": str(Path(b.release.path))}
        else:
            out["release"] = None
        return out
