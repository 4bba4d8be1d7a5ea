"""Compute users' history states with one release's user tower: the offline half of the hybrid service."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from towerflow.infra.releases import LoadedRelease
from towerflow.models.batch import Batch
from towerflow.serving.history import EventArrays, Histories, build_histories, from_us
from towerflow.serving.retrieval import encode_histories
from towerflow.serving.state_store import UserState
from towerflow.tasks.build_examples import Vocab


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
    max_seq_len: int,
    max_seen: int = 200,
    batch_size: int = 1024,
    item_table: torch.Tensor | None = None,
) -> Iterator[UserState]:
    """States of every user with an action on a known item in ``events`` before ``as_of_us``, tagged with
    ``release.release_id``. Histories as build_examples builds them (serving/history.py), gaps from ``as_of``."""
    hist = build_histories(events, vocab, as_of_us, max_seq_len, release.model.cfg.gap_buckets, max_seen)
    h = encode(release, hist, batch_size, item_table)
    as_of = from_us(as_of_us)
    for i, user_id in enumerate(hist.user_id.tolist()):
        yield UserState(user_id, release.release_id, h[i], from_us(hist.last_event_us[i]), as_of, hist.seen[i])
