"""Compute users' history states with one release's user tower: the offline half of the hybrid service."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import numpy as np
import torch

from towerflow.data.source import EventSource
from towerflow.infra.releases import LoadedRelease
from towerflow.models.batch import Batch
from towerflow.serving.retrieval import encode_histories
from towerflow.serving.state_store import UserState
from towerflow.tasks.history import EventArrays, Histories, HistorySpec, build_histories, from_us
from towerflow.tasks.vocabulary import Vocab


def history_batch(hist: Histories, rows) -> Batch:
    """Rows of ``hist`` as a Batch whose history fields are set (context fields empty: not used to encode)."""
    t = {name: torch.from_numpy(np.ascontiguousarray(getattr(hist, name)[rows]))
         for name in ("hist_items", "hist_actions", "hist_gaps")}
    b = t["hist_items"].shape[0]
    zero = torch.zeros(b, dtype=torch.long)
    return Batch(**t, context_items=zero, surface=zero, user_feats=torch.zeros((b, 0), dtype=torch.long),
                 target_items=zero)


def encode(release: LoadedRelease, hist: Histories, batch_size: int = 1024,
           item_table: torch.Tensor | None = None) -> np.ndarray:
    """hist (m users) -> h (m, history_dim) float32, ``batch_size`` users at a time (bounded memory).

    ``item_table``: the release's item vectors by index (``ServingBundle.item_table``), as the service uses.
    """
    out = np.zeros((len(hist), release.model.history_dim), dtype=np.float32)
    for s in range(0, len(hist), batch_size):
        rows = np.arange(s, min(s + batch_size, len(hist)))
        out[rows] = encode_histories(release, history_batch(hist, rows), item_table).numpy()
    return out


def compute_user_states(
    release: LoadedRelease,
    vocab: Vocab,
    events: EventArrays,
    as_of_us: int,
    spec: HistorySpec,
    max_seen: int = 1000,
    batch_size: int = 1024,
    item_table: torch.Tensor | None = None,
) -> Iterator[UserState]:
    """States of every user with an action on a known item in ``events`` before ``as_of_us``, tagged with
    ``release.release_id``. Histories as training builds them (tasks/history.py), as of ``as_of_us``."""
    hist = build_histories(events, vocab, as_of_us, spec, max_seen)
    h = encode(release, hist, batch_size, item_table)
    as_of = from_us(as_of_us)
    for i, user_id in enumerate(hist.user_id.tolist()):
        yield UserState(user_id, release.release_id, h[i], from_us(hist.last_event_us[i]), as_of, hist.seen[i])


def refresh_events(source: EventSource, as_of: datetime, lookback_days: int,
                   since: datetime | None) -> tuple[EventArrays, bool]:
    """The history actions a refresh at ``as_of`` computes states from -> (events, incremental).

    ``since`` (the release's last refresh) inside ``(as_of - lookback_days, as_of]``: only the users who acted in
    ``[since, as_of)``, with their whole window (a state depends on nothing else, tasks/history.py); otherwise
    every user's actions in ``[as_of - lookback_days, as_of)``.
    """
    start = as_of - timedelta(days=lookback_days)
    if since is None or not start < since <= as_of:
        return EventArrays.from_events(source.read_events(start, as_of)), False
    if since == as_of:
        return EventArrays.empty(), True
    recent = EventArrays.from_events(source.read_events(since, as_of))
    if len(recent) == 0:
        return recent, True
    older = EventArrays.from_events(source.read_events(start, since))
    return older.take(np.isin(older.user_id, np.unique(recent.user_id))).concat(recent), True
