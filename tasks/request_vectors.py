"""The retriever's user vector at each ranking request, point in time: what the ranker's retrieval score is made of.

``/recommend`` retrieves its candidates with ``u``, the release's user tower over the user's history at the request
combined with the request's context (serving/service.py ``retrieve_batch``); its ranker reads ``u . v`` of each
candidate (models/ranker.py ``retrieval_features``). Ranking examples get the same ``u`` for their request: the
release's user tower over THE history of tasks/history.py strictly before the request (``histories_at``, i.e.
``build_histories`` at ``as_of = request time``, what serving computes), the request's viewed item, surface and
search query, and the user's demographics. Serving's fall-backs are mirrored: a user with no history is searched
with the viewed item's own vector (the "context" path), and one with neither has no vector (the "popularity"
path): a zero row, which the ranker reads as "no retrieval score".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from towerflow.models.query import encode_texts
from towerflow.tasks.history import EventArrays, HistorySpec, histories_at
from towerflow.tasks.vocabulary import Vocab


@dataclass(frozen=True)
class Retriever:
    """What a request's ``u`` needs from one release: its two-tower model, item table, demographics and history spec."""

    model: Any  # models.two_tower.TwoTower, used in eval mode
    item_table: torch.Tensor  # (n_items + 1, d): row i = the release's vector of vocabulary item i, row 0 padding's
    user_feats: np.ndarray  # (n_users + 1, F) int64 demographic codes by vocabulary user index (row 0: unknown)
    spec: HistorySpec  # the release's history definition (its examples config)

    @classmethod
    def of(cls, model: Any, item_vectors: np.ndarray, user_feats: np.ndarray, spec: HistorySpec) -> Retriever:
        """``item_vectors`` (n_items, d): the release's item embeddings in vocabulary order (``item_embeddings.npy``).
        Row 0 of the table is the item tower's padding vector, as serving's (serving/bundle.py ``_item_table``)."""
        model.eval()  # the padding row as serving computes it (no id dropout), whatever mode the caller left
        with torch.inference_mode():
            pad = model.item_tower(torch.zeros(1, dtype=torch.long))  # (1, d)
        table = torch.cat([pad, torch.from_numpy(np.asarray(item_vectors, dtype=np.float32))])
        return cls(model, table, np.asarray(user_feats, dtype=np.int64), spec)


@torch.inference_mode()
def request_user_vectors(retriever: Retriever, hist: EventArrays, vocab: Vocab, user_id: np.ndarray,
                         request_us: np.ndarray, context_item: np.ndarray, surface: np.ndarray,
                         query: np.ndarray | list, batch_size: int = 1024) -> np.ndarray:
    """(n, d) float32: ``u`` of each request (module docstring), zeros where serving has none.

    hist: history actions (``EventArrays.from_events``, time ordered); user_id, request_us (n,) int64;
    context_item (n,) vocabulary item index of the viewed item (0: none); surface (n,) SURFACE_INDEX;
    query (n,) the search query text (None where none).
    """
    n = len(user_id)
    model, table = retriever.model, retriever.item_table
    if model.training:
        model.eval()
    items, actions, gaps = histories_at(hist, vocab, np.asarray(user_id, np.int64), np.asarray(request_us, np.int64),
                                        retriever.spec)
    tokens = encode_texts(np.asarray(query, dtype=object))
    feats = retriever.user_feats[vocab.user_index(user_id)]
    out = np.zeros((n, table.shape[1]), dtype=np.float32)
    has_history = (items > 0).any(axis=1)
    ctx = np.asarray(context_item, dtype=np.int64)
    surface = np.asarray(surface, np.int64)
    for a in range(0, n, batch_size):
        rows = np.flatnonzero(has_history[a : a + batch_size]) + a
        if not len(rows):
            continue
        hi, ha, hg, c, s, f, q = (torch.from_numpy(np.ascontiguousarray(x[rows]))
                                  for x in (items, actions, gaps, ctx, surface, feats, tokens))
        h = model.user_tower.encode_history(hi, ha, hg, table[hi])  # (b, history_dim), serving's encode_histories
        # serving's user_vectors; padding columns of the query add zeros (a sum bag): its width does not change u
        out[rows] = model.user_tower.combine(h, c, s, f, table[c], q).numpy()
    near = ~has_history & (ctx > 0)  # no history: the viewed item's neighbours, as serving's "context" path
    out[near] = table[torch.from_numpy(ctx[near])].numpy()
    return out
