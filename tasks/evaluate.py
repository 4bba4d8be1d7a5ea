"""Exact full-corpus retrieval metrics, slices, and the popularity and co-occurrence baselines.

Every scorer (a model's vectors or a baseline) is ranked the same way:

- the corpus is every real item (indices 1..n_items); index 0 is padding and never ranked;
- items the user acted on before the example (``seen``, a CSR per row) are removed, except the target itself;
- the target's rank is 1 + the number of remaining items scoring higher OR EQUAL (ties count against the
  target, so a constant scorer cannot look good);
- recall@K = hr@K = 1 if rank <= K (each row has exactly one target, so the two coincide; both are reported so the
  names match the literature), ndcg@K = 1 / log2(rank + 1) if rank <= K, else 0; all averaged over rows.

Scores are computed in row chunks so memory stays about ``chunk_rows x n_items`` floats whatever the holdout size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from towerflow.contract import ACTIONS, POSITIVE_ACTIONS, SURFACES
from towerflow.errors import TowerflowError
from towerflow.tasks.build_examples import Examples, SequenceExamples
from towerflow.tasks.history import SeenItems

SCORE_BUDGET = 1 << 24  # floats per chunk of scores (64 MiB as float32)
DENSE_COOC_MAX_ITEMS = 8192  # co-occurrence as a dense float32 matrix up to 256 MiB
EXPAND_BUDGET = 1 << 22  # co-occurrence entries gathered at once on the sparse path
POSITIVE_ACTION_IDS = np.array([1 + ACTIONS.index(a) for a in POSITIVE_ACTIONS])


class EvaluationError(TowerflowError):
    """Inputs to evaluation disagree (shapes, non-finite vectors, targets outside the corpus)."""


def _as_seen(exclude, n_rows: int) -> SeenItems | None:
    if exclude is None:
        return None
    seen = exclude if isinstance(exclude, SeenItems) else SeenItems(np.asarray(exclude[0]), np.asarray(exclude[1]))
    if len(seen) != n_rows:
        raise EvaluationError(f"exclusions have {len(seen)} rows, targets have {n_rows}")
    return seen


def target_ranks(
    score_rows: Callable[[np.ndarray], np.ndarray],
    targets: np.ndarray,
    n_items: int,
    exclude: SeenItems | tuple[np.ndarray, np.ndarray] | None = None,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """(n,) 1-based rank of each row's target among the n_items real items, seen items removed, ties pessimistic.

    ``score_rows(rows)`` returns the (len(rows), n_items + 1) scores of those rows (column 0 = padding, ignored).
    """
    targets = np.asarray(targets, dtype=np.int64)
    n = len(targets)
    if n and (targets.min() < 1 or targets.max() > n_items):
        raise EvaluationError(f"targets must be item indices in 1..{n_items}; got {targets.min()}..{targets.max()}")
    seen = _as_seen(exclude, n)
    chunk_rows = chunk_rows or max(1, SCORE_BUDGET // (n_items + 1))
    ranks = np.empty(n, dtype=np.int64)
    for lo in range(0, n, chunk_rows):
        rows = np.arange(lo, min(n, lo + chunk_rows))
        scores = np.array(score_rows(rows), copy=True)  # keeps the scorer's dtype; writable
        if scores.shape != (len(rows), n_items + 1):
            raise EvaluationError(f"scores for {len(rows)} rows have shape {scores.shape}, want {(len(rows), n_items + 1)}")
        local = np.arange(len(rows))
        t = targets[rows]
        target_score = scores[local, t].copy()
        scores[:, 0] = -np.inf
        if seen is not None:
            a, b = seen.indptr[rows[0]], seen.indptr[rows[-1] + 1]
            counts = np.diff(seen.indptr[rows[0] : rows[-1] + 2])
            scores[np.repeat(local, counts), seen.indices[a:b]] = -np.inf
        scores[local, t] = -np.inf  # the target never competes with itself
        ranks[rows] = 1 + (scores >= target_score[:, None]).sum(axis=1)
    return ranks


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (10, 50, 100)) -> dict[str, float]:
    """recall@K, ndcg@K, hr@K for each K (means over rows) and n, the number of rows."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {"n": float(len(ranks))}
    for k in ks:
        hit = ranks <= k
        mean = (lambda x: float(x.mean())) if len(ranks) else (lambda x: float("nan"))
        out[f"recall@{k}"] = mean(hit)
        out[f"ndcg@{k}"] = mean(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0))
        out[f"hr@{k}"] = mean(hit)
    return out


def _check_vectors(name: str, v) -> np.ndarray:
    v = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float32)
    if v.ndim != 2:
        raise EvaluationError(f"{name} must be 2-d; got shape {v.shape}")
    if not np.isfinite(v).all():
        raise EvaluationError(f"{name} contains NaN or infinite values")
    return v


def vector_ranks(user_vecs, item_vecs, targets, exclude=None, chunk_rows: int | None = None) -> np.ndarray:
    """Ranks by dot product. user_vecs (n, d); item_vecs (n_items + 1, d), row i = item index i (row 0 ignored)."""
    u = _check_vectors("user_vecs", user_vecs)
    v = _check_vectors("item_vecs", item_vecs)
    if u.shape[1] != v.shape[1] or u.shape[0] != len(targets):
        raise EvaluationError(f"user_vecs {u.shape}, item_vecs {v.shape} and {len(targets)} targets disagree")
    return target_ranks(lambda rows: u[rows] @ v.T, targets, v.shape[0] - 1, exclude, chunk_rows)


def retrieval_metrics(
    user_vecs, item_vecs, targets, exclude=None, ks: Sequence[int] = (10, 50, 100)
) -> dict[str, float]:
    """Exact full-corpus recall@K, ndcg@K, hr@K (and n) of dot-product retrieval; shapes as in ``vector_ranks``."""
    return metrics_from_ranks(vector_ranks(user_vecs, item_vecs, targets, exclude), ks)


def evaluate_slices(
    ranks: np.ndarray, examples: SequenceExamples, ks: Sequence[int] = (10, 50, 100), short_history_max: int = 5
) -> dict[str, dict[str, float]]:
    """Metrics overall ("all"), per surface ("surface=related", ...) and for short histories ("short_history").

    ``ranks`` are aligned with ``examples`` rows. Short history = at most ``short_history_max`` actions before the
    target (counted in the padded history, so the bound must be below L). Empty slices are left out.
    """
    if len(ranks) != len(examples):
        raise EvaluationError(f"{len(ranks)} ranks for {len(examples)} examples")
    if short_history_max >= examples.max_seq_len:
        raise EvaluationError(f"short_history_max={short_history_max} must be below the history length")
    masks = {"all": np.ones(len(ranks), dtype=bool)}
    for i, s in enumerate(SURFACES):
        masks[f"surface={s}"] = examples.surface == i
    masks["short_history"] = examples.history_length() <= short_history_max
    return {name: metrics_from_ranks(ranks[m], ks) for name, m in masks.items() if m.any()}


# --------------------------------------------------------------------------------------------------- baselines


class PopularityBaseline:
    """Scores every item by its exact number of positive train targets (no per-batch approximation)."""

    def __init__(self, counts: np.ndarray):
        self.counts = counts  # (n_items + 1,) float64

    @classmethod
    def fit(cls, train: SequenceExamples, n_items: int | None = None) -> PopularityBaseline:
        n_items = int(train.target_items.max(initial=0)) if n_items is None else n_items
        return cls(np.bincount(train.target_items, minlength=n_items + 1).astype(np.float64))

    def scores(self) -> np.ndarray:
        """(n_items + 1,) exact counts; index 0 is padding."""
        return self.counts

    def score_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(rows), len(self.counts)))


def _source_items(ex: SequenceExamples, rows: np.ndarray) -> np.ndarray:
    """(len(rows), L + 1) the distinct positive history items and the context item of each row, 0 elsewhere."""
    pos = np.isin(ex.hist_actions[rows], POSITIVE_ACTION_IDS)
    src = np.concatenate([np.where(pos, ex.hist_items[rows], 0), ex.context_items[rows][:, None]], axis=1)
    src = np.sort(src, axis=1)
    src[:, 1:][src[:, 1:] == src[:, :-1]] = 0  # each source item counts once per row
    return src


class CooccurrenceBaseline:
    """Item-to-item co-occurrence: C[a, b] = number of train examples with target b in which a was a positive
    history item or the context. A user is scored by sum over their distinct sources a of C[a, b]; ties (most items
    share a count of 0) are broken by popularity, scaled below 1 so it never outweighs one co-occurrence.
    """

    def __init__(
        self,
        indptr: np.ndarray,
        cols: np.ndarray,
        vals: np.ndarray,
        popularity: np.ndarray,
        dense_max_items: int = DENSE_COOC_MAX_ITEMS,
    ):
        self.indptr, self.cols, self.vals = indptr, cols, vals  # CSR of C by source item
        self.popularity = popularity  # (n_items + 1,)
        self.tiebreak = popularity / (popularity.max(initial=0) + 1.0)
        self.dense_max_items = dense_max_items
        self._dense: torch.Tensor | None = None

    @classmethod
    def fit(cls, train: SequenceExamples, n_items: int | None = None) -> CooccurrenceBaseline:
        n_items = int(train.target_items.max(initial=0)) if n_items is None else n_items
        m = np.int64(n_items + 1)
        src = _source_items(train, np.arange(len(train)))
        tgt = np.broadcast_to(train.target_items[:, None], src.shape)
        keep = (src > 0) & (src != tgt)
        pairs, counts = np.unique(src[keep] * m + tgt[keep], return_counts=True)
        a, b = pairs // m, pairs % m
        indptr = np.zeros(m + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(np.bincount(a, minlength=m))
        pop = PopularityBaseline.fit(train, n_items).counts
        return cls(indptr, b, counts.astype(np.float64), pop)

    def cooccurrence(self, a: int) -> dict[int, float]:
        """Row a of C as {b: count} (for inspection and tests)."""
        s = slice(self.indptr[a], self.indptr[a + 1])
        return dict(zip(self.cols[s].tolist(), self.vals[s].tolist(), strict=True))

    def scorer(self, examples: SequenceExamples) -> Callable[[np.ndarray], np.ndarray]:
        """score_rows for ``target_ranks`` over the rows of ``examples``: (len(rows), n_items + 1) float64.

        Small catalogs multiply a sparse (rows x sources) indicator by a dense C (one pass in C++); larger ones add
        up CSR rows of C with bincount in blocks of bounded size, so memory never grows with n_items squared.
        """
        m = len(self.popularity)
        dense = m <= self.dense_max_items + 1

        def score_rows(rows: np.ndarray) -> np.ndarray:
            src = _source_items(examples, rows)
            r, c = np.nonzero(src)
            a = src[r, c]
            if dense:
                ind = torch.sparse_coo_tensor(
                    torch.from_numpy(np.stack([r, a])), torch.ones(len(r)), (len(rows), m), check_invariants=False
                )
                out = torch.sparse.mm(ind, self._dense_matrix()).numpy().astype(np.float64)
            else:
                out = self._sparse_scores(r, a, len(rows))
            return out + self.tiebreak  # float64: counts plus a fraction below 1 stay exact

        return score_rows

    def _dense_matrix(self) -> torch.Tensor:
        if self._dense is None:
            m = len(self.popularity)
            a = np.repeat(np.arange(m), np.diff(self.indptr))
            dense = np.zeros((m, m), dtype=np.float32)  # counts are exact in float32 up to 2**24
            dense[a, self.cols] = self.vals
            self._dense = torch.from_numpy(dense)
        return self._dense

    def _sparse_scores(self, r: np.ndarray, a: np.ndarray, n_rows: int) -> np.ndarray:
        m = len(self.popularity)
        out = np.zeros(n_rows * m)
        lengths = self.indptr[a + 1] - self.indptr[a]
        ends = np.cumsum(lengths)
        lo = 0
        while lo < len(a):  # blocks of (row, source) pairs whose C rows hold about EXPAND_BUDGET entries
            base = ends[lo - 1] if lo else 0
            hi = max(lo + 1, int(np.searchsorted(ends, base + EXPAND_BUDGET, side="right")))
            ln = lengths[lo:hi]
            starts = np.repeat(self.indptr[a[lo:hi]], ln)
            offsets = np.arange(ln.sum()) - np.repeat(np.cumsum(ln) - ln, ln)
            flat = np.repeat(r[lo:hi], ln) * m + self.cols[starts + offsets]
            out += np.bincount(flat, weights=self.vals[starts + offsets], minlength=n_rows * m)
            lo = hi
        return out.reshape(n_rows, m)


def baseline_ranks(examples: Examples, on: str = "holdout", refit_rows: bool = False) -> dict[str, np.ndarray]:
    """Ranks of the holdout (or "valid") targets under each baseline, fitted on the train split.

    ``refit_rows``: the model they are compared with was refit on train + the validation window's rows
    (tasks/refit.py), so the baselines are fitted on those rows too: both sides learn from the same data (fresh
    items on the validation day would otherwise count for the model alone). Only against the holdout: the
    validation targets are among those rows.
    """
    ex, seen = (examples.holdout, examples.holdout_seen) if on == "holdout" else (examples.valid, examples.valid_seen)
    if ex is None:
        raise EvaluationError(f"no {on} split in these examples")
    if refit_rows and on != "holdout":
        raise EvaluationError("baselines fitted on the refit's rows can only be scored on the holdout")
    train = examples.train
    if refit_rows:
        if examples.refit_extra is None:  # silently train-only would judge a refit model against weaker baselines
            raise EvaluationError("baselines for a refit model need the refit's rows, and these examples hold none "
                                  "(augment_examples(refit=False) drops them)")
        train = train.concat(examples.refit_extra)
    n_items = examples.vocab.n_items
    pop = PopularityBaseline.fit(train, n_items)
    cooc = CooccurrenceBaseline.fit(train, n_items)
    return {
        "popularity": target_ranks(pop.score_rows, ex.target_items, n_items, seen),
        "cooccurrence": target_ranks(cooc.scorer(ex), ex.target_items, n_items, seen),
    }


def baseline_metrics(examples: Examples, ks: Sequence[int] = (10, 50, 100)) -> dict[str, dict[str, float]]:
    """{"popularity": metrics, "cooccurrence": metrics} on the holdout, same exclusions as the model."""
    return {name: metrics_from_ranks(r, ks) for name, r in baseline_ranks(examples).items()}


def baseline_slices(
    examples: Examples, ks: Sequence[int] = (10, 50, 100), short_history_max: int = 5
) -> dict[str, dict[str, dict[str, float]]]:
    """{baseline: {slice: metrics}} on the holdout."""
    return {
        name: evaluate_slices(r, examples.holdout, ks, short_history_max)
        for name, r in baseline_ranks(examples).items()
    }
