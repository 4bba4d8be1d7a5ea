"""Index gate: Recall@K of the ANN index against exact inner-product search over the same item vectors.

Recall for one query is the share of its K exact neighbours the index returns. Exact ties make "the" top K
ambiguous, so an index result counts as a hit when its true score reaches the K-th best exact score (within float
tolerance); without ties this is plain id-overlap recall. Missing results (FAISS pads with -1), ids the catalog does
not know and repeated ids count as misses.

The queries are what serving will send: the user vectors (history + live context) of a sample of holdout
examples, through the candidate's own towers (``holdout_queries``), not item vectors or perturbations of them,
whose neighbourhoods an index can serve well while the users' are served badly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from towerflow.config import GateConfig, IndexConfig
from towerflow.errors import TowerflowError
from towerflow.models.two_tower import TwoTower
from towerflow.tasks.build_examples import SequenceExamples
from towerflow.tasks.scoring import user_vectors
from towerflow.validation.result import MAX_EXAMPLES, Check, GateResult

IndexSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
_CHUNK_ELEMENTS = 1 << 24  # bound the (queries x items) exact score block to ~64 MB of float32


def _rows_of(ids: np.ndarray, item_ids: np.ndarray | None, n: int) -> np.ndarray:
    """Map returned ids (q, k) to rows of ``item_vectors``; -1 where the id is padding or unknown."""
    if item_ids is None:
        return np.where((ids >= 0) & (ids < n), ids, -1)
    order = np.argsort(item_ids)
    pos = np.clip(np.searchsorted(item_ids, ids, sorter=order), 0, n - 1)
    rows = order[pos]
    return np.where(item_ids[rows] == ids, rows, -1)


def _hits(rows: np.ndarray, exact: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Per query, how many of the returned rows are true top-K (distinct, known, score >= K-th best)."""
    q = np.arange(len(rows))[:, None]
    true = np.where(rows >= 0, exact[q, np.maximum(rows, 0)], -np.inf)  # (q, k)
    tol = 1e-5 * np.maximum(1.0, np.abs(kth))[:, None]
    hit = (rows >= 0) & (true >= kth[:, None] - tol)
    srt = np.sort(np.where(hit, rows, -1), axis=1)  # repeated rows count once
    dup = np.zeros_like(hit)
    dup[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    return hit.sum(axis=1) - dup.sum(axis=1)


def check_index_recall(
    index_search: IndexSearch,
    item_vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    config: GateConfig,
    item_ids: np.ndarray | None = None,
) -> GateResult:
    """Mean ANN Recall@K over ``queries`` (q, d) must reach ``config.min_index_recall``.

    ``index_search(queries, k) -> (scores (q, k), ids (q, k))`` is the index as serving will call it (e.g. a FAISS
    index's ``search``). ``item_vectors`` (n, d) are the vectors it was built from; ``item_ids`` (n,) are the ids
    it returns for them (default: row positions). K is capped at n.
    """
    items = np.ascontiguousarray(item_vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if items.ndim != 2 or queries.ndim != 2 or items.shape[1] != queries.shape[1]:
        raise TowerflowError(f"index gate: item vectors {items.shape} and queries {queries.shape} must be (n, d), (q, d)")
    n, nq = len(items), len(queries)
    if n == 0 or nq == 0:
        return GateResult("index", [Check(f"ann recall@{k}", False, None, config.min_index_recall,
                                          f"nothing to measure: {n} items, {nq} queries")])
    k_eff = min(k, n)
    _, ids = index_search(queries, k_eff)
    ids = np.asarray(ids)
    if ids.shape != (nq, k_eff):
        return GateResult("index", [Check("result shape", False, list(ids.shape), [nq, k_eff],
                                          f"index returned ids of shape {ids.shape}, expected {(nq, k_eff)}")])
    rows = _rows_of(ids.astype(np.int64), None if item_ids is None else np.asarray(item_ids, np.int64), n)
    hits = np.empty(nq, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // n)
    for s in range(0, nq, step):
        exact = queries[s:s + step] @ items.T  # (b, n)
        kth = np.partition(exact, n - k_eff, axis=1)[:, n - k_eff]  # K-th best exact score per query
        hits[s:s + step] = _hits(rows[s:s + step], exact, kth)
    recall = hits / k_eff  # (q,)
    mean = float(recall.mean())
    worst = np.argsort(recall, kind="stable")[:MAX_EXAMPLES]
    padded = int((ids < 0).sum())
    detail = (f"mean recall@{k_eff} {mean:.4f} over {nq} queries (min {recall.min():.3f}; "
              f"{int((recall < 1).sum())} queries below 1.0; {padded} empty results)")
    examples = [{"query": int(i), "recall": round(float(recall[i]), 4)} for i in worst if recall[i] < 1]
    return GateResult("index", [Check(f"ann recall@{k_eff}", mean >= config.min_index_recall, mean,
                                      config.min_index_recall, detail, examples)])


def holdout_queries(model: TwoTower, holdout: SequenceExamples, user_feats: np.ndarray, n: int,
                    seed: int = 0) -> np.ndarray:
    """The index gate's queries: the user vectors of ``min(n, len(holdout))`` holdout examples drawn without
    replacement (``seed``) -> (q, d) float32, the vectors serving will search the index with."""
    rows = np.sort(np.random.default_rng(seed).choice(len(holdout), size=min(n, len(holdout)), replace=False))
    return user_vectors(model, holdout.take(rows), user_feats)


def gate_index_on_holdout(index_search: IndexSearch, item_vectors: np.ndarray, item_ids: np.ndarray,
                          model: TwoTower, holdout: SequenceExamples, user_feats: np.ndarray, config: IndexConfig,
                          gates: GateConfig) -> GateResult:
    """The index gate of a retrain: Recall@``config.recall_k`` over ``config.recall_sample`` holdout user vectors."""
    queries = holdout_queries(model, holdout, user_feats, config.recall_sample)
    return check_index_recall(index_search, item_vectors, queries, config.recall_k, gates, item_ids=item_ids)
