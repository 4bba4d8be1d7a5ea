"""Run a trained model over examples: user vectors, item vectors, exact metrics; remap examples to another vocab.

Shared by training (early stopping), evaluation (candidate and champion on the same holdout) and benchmarks.
"""

from __future__ import annotations

import numpy as np
import torch

from towerflow.models.two_tower import TwoTower
from towerflow.tasks.build_examples import SequenceExamples
from towerflow.tasks.evaluate import metrics_from_ranks, vector_ranks
from towerflow.tasks.history import SeenItems
from towerflow.tasks.vocabulary import Vocab


@torch.no_grad()
def user_vectors(model: TwoTower, seq: SequenceExamples, user_feats: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """seq of n examples -> (n, dim) float32 user vectors, in eval mode."""
    was_training = model.training
    model.eval()
    device = model.item_tower.category.device
    try:
        out = np.empty((len(seq), model.cfg.dim), dtype=np.float32)
        for start in range(0, len(seq), batch_size):
            idx = np.arange(start, min(start + batch_size, len(seq)))
            out[idx] = model.user_vectors(seq.to_batch(idx, user_feats).to(device)).cpu().numpy()
        return out
    finally:
        model.train(was_training)


def item_matrix(model: TwoTower) -> np.ndarray:
    """(n_items + 1, dim) float32: row i is item index i; row 0 (padding) is zeroed so it never ranks first."""
    vecs = model.all_item_vectors().cpu().numpy().astype(np.float32)
    vecs[0] = 0.0
    return vecs


def model_ranks(model: TwoTower, seq: SequenceExamples, user_feats: np.ndarray, seen: SeenItems) -> np.ndarray:
    """(n,) rank of each target under ``model`` (seen items excluded); a target the model has no vector for
    (index 0, e.g. an item newer than a champion) cannot be retrieved and gets a rank past every K."""
    items = item_matrix(model)
    ranks = np.full(len(seq), len(items) + 1, dtype=np.int64)
    known = np.flatnonzero(seq.target_items > 0)
    if len(known):
        users = user_vectors(model, seq.take(known), user_feats)
        ranks[known] = vector_ranks(users, items, seq.target_items[known], seen.take(known))
    return ranks


def model_metrics(
    model: TwoTower, seq: SequenceExamples, user_feats: np.ndarray, seen: SeenItems, ks: tuple[int, ...]
) -> dict[str, float]:
    """Exact full-corpus metrics of ``model`` on ``seq`` with ``seen`` items excluded."""
    return metrics_from_ranks(model_ranks(model, seq, user_feats, seen), ks)


def remap_examples(
    seq: SequenceExamples, seen: SeenItems, src: Vocab, dst: Vocab
) -> tuple[SequenceExamples, SeenItems]:
    """Re-express examples built with vocab ``src`` in vocab ``dst`` (e.g. the champion's), through the raw ids.

    Items ``dst`` never saw become 0 (padding in histories, no context, an unreachable target: an honest miss).
    """

    def remap(a: np.ndarray, src_ids: np.ndarray, lookup) -> np.ndarray:
        flat = a.reshape(-1)
        ids = np.where(flat > 0, src_ids[np.maximum(flat, 1) - 1], -1)
        return np.where(flat > 0, lookup(ids), 0).astype(np.int64).reshape(a.shape)

    def items(a: np.ndarray) -> np.ndarray:
        return remap(a, src.item_ids, dst.item_index)

    def users(a: np.ndarray) -> np.ndarray:
        return remap(a, src.user_ids, dst.user_index)

    hist = items(seq.hist_items)
    out = SequenceExamples(
        user_idx=users(seq.user_idx),
        hist_items=hist,
        hist_actions=np.where(hist > 0, seq.hist_actions, 0),
        hist_gaps=np.where(hist > 0, seq.hist_gaps, 0),
        context_items=items(seq.context_items),
        surface=seq.surface.copy(),
        target_items=items(seq.target_items),
        ts=seq.ts.copy(),
        query=seq.query.copy(),  # token hashes do not depend on a vocabulary
    )
    mapped = items(seen.indices)
    rows = [mapped[seen.indptr[r] : seen.indptr[r + 1]] for r in range(len(seen))]
    return out, SeenItems.from_lists([r[r > 0] for r in rows])
