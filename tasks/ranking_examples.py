"""Point-in-time ranking examples: what a request showed, what the user did with each shown item, and the user's
action sequence strictly before the request.

A **request** is the events sharing a ``request_id`` (the contract's optional column: one slate); rows without one
(or sources without the column) form one request per ``(user_id, ts, surface)``, so a source that logs an impression
and a later click of the same item as two rows must give them a ``request_id`` to tie them. The request time is its
earliest row. Its **examples** are its distinct shown items known to the release vocabulary; each is labelled per
head (``RANKER_HEADS``: click, save, conversion, skip, hide) with what the request's rows record for that item, so a
shown item without engagement (an ``impression`` row alone) is a negative for every head.

The **sequence** is THE history of ``tasks/history.py`` (its action codes, impressions left out, same-timestamp ties
ordered by ``event_id``, actions older than ``max_history_days`` cut, the last S kept, left-padded with 0) at the
request time, strictly before it: nothing at or after the request time enters, not even the request's own rows.
Beside it, each action's age at the request (seconds) feeds the training-time window mask (models/transact.py).

With a ``retriever`` (tasks/request_vectors.py) each request also gets the retriever's user vector at its time, the
``u`` /recommend's first stage searches with, for the ranker's retrieval score; ``with_retrieved_candidates`` adds
retrieved items the request did not show as rows without engagement.

Sources without impressions (MovieLens ratings, implicit files) hold no slates. The plan for them (not built yet):
the shown items of a request are the retrieval candidates of the same release at that time, labelled by what the
user did with them later in the window; the ratings' 4-5 stars positive and 1-2 negative.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from towerflow.config import RANKER_HEADS
from towerflow.contract import POSITIVE_ACTIONS, SURFACES, ContractError, check_columns
from towerflow.tasks.history import (
    ACTION_INDEX,
    EventArrays,
    action_codes,
    history_ranges,
    history_tokens,
    user_ranges_before,
)
from towerflow.tasks.request_vectors import Retriever, request_user_vectors
from towerflow.tasks.vocabulary import Vocab, value_codes

HEAD_CODES = np.array([ACTION_INDEX[h] for h in RANKER_HEADS], dtype=np.int64)  # label column h <- this action
POSITIVE_CODES = np.array([ACTION_INDEX[a] for a in POSITIVE_ACTIONS], dtype=np.int64)


@dataclass
class RankingExamples:
    """n (request, shown item) rows, grouped by request (contiguous), requests in time order."""

    request: np.ndarray  # (n,) int64 request number, 0.. in time order
    user_id: np.ndarray  # (n,) int64 raw user id
    ts_us: np.ndarray  # (n,) int64 request time, epoch microseconds
    surface: np.ndarray  # (n,) int64 index into contract SURFACES
    item: np.ndarray  # (n,) int64 item index of the release vocabulary (>= 1)
    labels: np.ndarray  # (n, H) float32, columns in RANKER_HEADS order
    hist_items: np.ndarray  # (n, S) int64 item indices, 0 = padding, latest last
    hist_actions: np.ndarray  # (n, S) int64 ACTION_INDEX codes, 0 = padding
    hist_age_s: np.ndarray  # (n, S) float32 seconds from each action to the request, 0 on padding
    # (n, d) float32 the retriever's user vector at the request (tasks/request_vectors.py), zeros where serving has
    # none; None: built without a retriever (a ranker with RankerConfig.retrieval_score cannot train on them)
    user_vector: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.request)

    @property
    def n_requests(self) -> int:
        return len(np.unique(self.request))

    def take(self, idx) -> RankingExamples:
        return RankingExamples(**{f.name: None if (a := getattr(self, f.name)) is None else a[idx]
                                  for f in fields(self)})

    def save(self, path: str | Path) -> None:
        np.savez(path, **{f.name: a for f in fields(self) if (a := getattr(self, f.name)) is not None})

    @classmethod
    def load(cls, path: str | Path) -> RankingExamples:
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls) if f.name in z})


def _request_keys(events: pd.DataFrame) -> np.ndarray:
    """(n,) int64 request of each row: its request_id, or (user_id, ts, surface) where it has none."""
    # times as int64 microseconds: a tz-aware column's to_numpy() is an object array of Timestamps (1.4 s per 280k)
    t = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8
    cols = pd.DataFrame({"u": events["user_id"].to_numpy(), "t": t, "s": events["surface"].to_numpy()})
    key = cols.groupby(["u", "t", "s"], sort=False).ngroup().to_numpy(dtype=np.int64)
    if "request_id" in events.columns:
        rid = pd.factorize(events["request_id"])[0].astype(np.int64)  # -1 = null
        key = np.where(rid >= 0, rid, rid.max(initial=-1) + 1 + key)
    return pd.factorize(key)[0].astype(np.int64)  # numbered in order of first appearance


def sequences_at(hist: EventArrays, vocab: Vocab, user_id: np.ndarray, request_us: np.ndarray, max_seq_len: int,
                 max_history_days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's sequence: its user's last ``max_seq_len`` history actions strictly before ``request_us``.

    hist: history actions (``EventArrays.from_events``, time ordered); user_id, request_us: (n,).
    Returns hist_items, hist_actions (n, S) int64 and hist_age_s (n, S) float32 (module docstring).
    """
    item, action, ts, start, end = history_ranges(hist, vocab, user_id, request_us, max_history_days)
    items, actions, _ = history_tokens(item, action, ts, start, end, max_seq_len, 2)
    # The same layout over the action times gives each slot's time (0 on padding): its age at the request.
    when, _, _ = history_tokens(ts, action, ts, start, end, max_seq_len, 2)
    age = np.where(actions > 0, (request_us[:, None] - when) / 1e6, 0.0).astype(np.float32)
    return items, actions, age


def build_ranking_examples(events: pd.DataFrame, vocab: Vocab, max_seq_len: int, max_history_days: int = 365,
                           start_us: int | None = None, end_us: int | None = None,
                           retriever: Retriever | None = None) -> RankingExamples:
    """Examples of the requests made in ``[start_us, end_us)`` (None: unbounded) of contract ``events``.

    Histories come from all of ``events`` (before each request). ``retriever``: also each request's user vector
    (``user_vector``) from that release's user tower and the request's viewed item, surface and query (its earliest
    row's). Raises ContractError on missing columns, unknown actions or surfaces, or a request_id shared by several
    users.
    """
    if max_seq_len < 1:
        raise ValueError(f"build_ranking_examples: max_seq_len must be at least 1, got {max_seq_len}")
    check_columns(events, "events")
    action = action_codes(events["action"])
    surface = value_codes(events["surface"], list(SURFACES)) - 1
    if (surface < 0).any():
        bad = sorted(set(events["surface"][surface < 0].astype(str)))
        raise ContractError(f"events.surface: values outside {SURFACES}: {bad[:5]}")
    ts = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8
    user = events["user_id"].to_numpy(dtype=np.int64)
    req = _request_keys(events)
    n_req = int(req.max(initial=-1)) + 1
    # per request: its time (earliest row), user and surface (of that earliest row)
    first = np.lexsort((ts, req))
    head = first[np.r_[True, req[first][1:] != req[first][:-1]]] if len(first) else first
    req_ts, req_user, req_surface = np.empty(n_req, np.int64), np.empty(n_req, np.int64), np.empty(n_req, np.int64)
    req_ts[req[head]], req_user[req[head]], req_surface[req[head]] = ts[head], user[head], surface[head]
    if (req_user[req] != user).any():
        bad = events["request_id"].to_numpy()[req_user[req] != user][0]
        raise ContractError(f"events.request_id: request {bad!r} holds events of more than one user")

    in_window = np.ones(n_req, bool)
    if start_us is not None:
        in_window &= req_ts >= start_us
    if end_us is not None:
        in_window &= req_ts < end_us
    item = vocab.item_index(events["item_id"].to_numpy(dtype=np.int64))
    rows = np.flatnonzero(in_window[req] & (item > 0))
    # distinct (request, item) pairs; labels: which head actions any of the pair's rows record
    pair, inverse = np.unique(np.stack([req[rows], item[rows]], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    labels = np.zeros((len(pair), len(RANKER_HEADS)), dtype=np.float32)
    hit = action[rows][:, None] == HEAD_CODES[None, :]  # (rows, H)
    np.maximum.at(labels, inverse, hit.astype(np.float32))
    r, it = pair[:, 0], pair[:, 1]
    order = np.lexsort((it, r, req_ts[r]))  # requests in time order, contiguous
    r, it, labels = r[order], it[order], labels[order]
    number = np.cumsum(np.r_[True, r[1:] != r[:-1]]) - 1 if len(r) else r

    hist = EventArrays.from_events(events)
    hist_items, hist_actions, hist_age = sequences_at(hist, vocab, req_user[r], req_ts[r], max_seq_len,
                                                      max_history_days)
    user_vector = None
    if retriever is not None:  # one u per request, then one row per shown item
        req_head = np.empty(n_req, np.int64)
        req_head[req[head]] = head
        rq = np.unique(r)  # the requests with rows
        h = req_head[rq]
        ctx = vocab.item_index(events["context_item_id"].to_numpy()[h])
        query = np.where(surface[h] == SURFACES.index("search"), events["query"].to_numpy(dtype=object)[h], None)
        u = request_user_vectors(retriever, hist, vocab, req_user[rq], req_ts[rq], ctx, req_surface[rq], query)
        user_vector = u[np.searchsorted(rq, r)]
    return RankingExamples(request=number.astype(np.int64), user_id=req_user[r], ts_us=req_ts[r],
                           surface=req_surface[r], item=it.astype(np.int64), labels=labels, hist_items=hist_items,
                           hist_actions=hist_actions, hist_age_s=hist_age, user_vector=user_vector)


def with_retrieved_candidates(ex: RankingExamples, item_table: np.ndarray, per_request: int, depth: int,
                              seed: int = 0) -> RankingExamples:
    """``ex`` plus, for each request with a user vector, ``per_request`` items drawn from the retriever's top ``depth``
    for it (``u . v`` over ``item_table``, the items it showed and its sequence's items left out) as rows with no
    engagement: a negative for every head, as an impression is.

    Why: the ranker otherwise learns from the slates the source showed, while /recommend asks it to order the
    retriever's candidates, all close to the user (the issue's "retrieval candidates as the shown items"). Rows are
    appended to their request (requests stay contiguous and in time order). item_table: (n_items + 1, D), row 0 out.
    """
    if ex.user_vector is None or per_request < 1 or len(ex) == 0:
        return ex
    rng = np.random.default_rng(seed)
    first = np.flatnonzero(np.r_[True, ex.request[1:] != ex.request[:-1]])  # each request's first row
    u = ex.user_vector[first]  # (R, D)
    has = np.abs(u).sum(axis=1) > 0
    items = np.asarray(item_table[1:], dtype=np.float32)  # (n_items, D)
    depth = min(depth, len(items))
    # (R, depth) item indices of each request's top depth, unordered; in blocks: R x n_items scores can be large
    top = np.concatenate([np.argpartition(-(u[a : a + 1024] @ items.T), depth - 1, axis=1)[:, :depth] + 1
                          for a in range(0, len(u), 1024)])
    bounds = np.r_[first, len(ex)]
    add_rows, add_items = [], []
    for r in np.flatnonzero(has).tolist():
        rows = np.arange(bounds[r], bounds[r + 1])
        out = np.union1d(ex.item[rows], ex.hist_items[rows[0]])
        pool = top[r][~np.isin(top[r], out)]
        pick = rng.choice(pool, size=min(per_request, len(pool)), replace=False)
        add_rows.append(np.full(len(pick), rows[0]))
        add_items.append(pick)
    if not add_rows:
        return ex
    src = np.concatenate(add_rows)
    extra = ex.take(src)
    extra.item = np.concatenate(add_items).astype(np.int64)
    extra.labels = np.zeros_like(extra.labels)
    both = RankingExamples(**{f.name: None if getattr(ex, f.name) is None else
                              np.concatenate([getattr(ex, f.name), getattr(extra, f.name)]) for f in fields(ex)})
    order = np.argsort(both.request, kind="stable")
    return both.take(order)


def user_profiles(events: pd.DataFrame, vocab: Vocab, item_vectors: np.ndarray, user_id: np.ndarray,
                  as_of_us: np.ndarray) -> np.ndarray:
    """(n, D) the mean item vector of each row's user's positive actions strictly before ``as_of_us``; 0 if none.

    A slow-moving user feature for the ranker's dense input (e.g. with ``as_of_us`` = the request's day start: a
    daily batch feature that knows nothing of the current session). item_vectors: (n_items + 1, D).
    """
    hist = EventArrays.from_events(events)
    item = vocab.item_index(hist.item_id)
    keep = np.isin(hist.action, POSITIVE_CODES) & (item > 0)
    by_user = np.argsort(hist.user_id[keep], kind="stable")
    user, item, ts = hist.user_id[keep][by_user], item[keep][by_user], hist.ts_us[keep][by_user]
    if len(user) == 0:
        return np.zeros((len(user_id), item_vectors.shape[1]), dtype=np.float32)
    cum = np.vstack([np.zeros((1, item_vectors.shape[1])), np.cumsum(item_vectors[item], axis=0)])  # (m + 1, D)
    start, end, _, _ = user_ranges_before(user, ts, user_id, as_of_us)
    count = end - start  # 0 for a user without positives
    total = cum[end] - cum[start]
    return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 0.0).astype(np.float32)


def latest_requests(examples: RankingExamples, share: float) -> np.ndarray:
    """(n,) bool: the rows of the latest ``share`` of requests (a validation split after its training rows)."""
    n_req = int(examples.request.max(initial=-1)) + 1
    return examples.request >= int(round(n_req * (1 - share)))


def split_by_time(examples: RankingExamples, share: float) -> tuple[RankingExamples, RankingExamples]:
    """(earlier rows, rows of the latest ``share`` of requests)."""
    late = latest_requests(examples, share)
    return examples.take(~late), examples.take(late)
