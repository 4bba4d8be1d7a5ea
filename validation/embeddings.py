"""Embedding health gate: finite vectors, the expected norms, and no collapse.

A collapsed tower maps every item to nearly the same direction; retrieval then returns the same items for every
user while losses can still look fine. Its signature is a high mean cosine between random item pairs (healthy
towers sit near 0; the default bound is 0.9).
"""

from __future__ import annotations

import numpy as np

from towerflow.config import GateConfig
from towerflow.errors import TowerflowError
from towerflow.validation.result import MAX_EXAMPLES, Check, GateResult


def _pairs(m: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` random index pairs (i, j) with i != j, drawn from range(m)."""
    i = rng.integers(0, m, n_pairs)
    j = rng.integers(0, m - 1, n_pairs)
    return i, j + (j >= i)  # skip the diagonal without rejection sampling


def check_embeddings(vectors: np.ndarray, config: GateConfig, seed: int = 0, normalized: bool = True) -> GateResult:
    """Check item (or user) vectors of shape (n, d).

    ``normalized``: the towers L2-normalise their output, so every norm must be within ``config.norm_tolerance``
    of 1; when False only zero vectors fail. Rows with NaN/inf are counted and left out of the other checks.
    ``config.collapse_pairs`` random pairs (seeded) estimate the mean cosine.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise TowerflowError(f"embedding gate: expected vectors of shape (n, d), got {vectors.shape}")
    n = len(vectors)
    finite_mask = np.isfinite(vectors)
    bad_rows = np.flatnonzero(~finite_mask.all(axis=1))
    n_nan, n_inf = int(np.isnan(vectors).sum()), int(np.isinf(vectors).sum())
    checks = [
        Check("finite", len(bad_rows) == 0, len(bad_rows), 0,
              f"{len(bad_rows)} of {n} vectors hold NaN/inf ({n_nan} NaN and {n_inf} inf values)",
              bad_rows[:MAX_EXAMPLES].tolist())
    ]
    keep = np.flatnonzero(finite_mask.all(axis=1))
    good = vectors[keep].astype(np.float64)  # (m, d)
    norms = np.linalg.norm(good, axis=1)  # (m,)
    if normalized:
        dev = np.abs(norms - 1.0)
        off = np.flatnonzero(dev > config.norm_tolerance)
        worst = float(dev.max()) if len(dev) else 0.0
        checks.append(Check("unit norm", len(off) == 0, worst, config.norm_tolerance,
                            f"{len(off)} of {len(keep)} vectors off unit norm (max |norm - 1| = {worst:.3g})",
                            keep[off[:MAX_EXAMPLES]].tolist()))
    else:
        zero = np.flatnonzero(norms <= 1e-12)
        checks.append(Check("non-zero norm", len(zero) == 0, len(zero), 0,
                            f"{len(zero)} of {len(keep)} vectors are zero", keep[zero[:MAX_EXAMPLES]].tolist()))
    m = len(keep)
    if m < 2:
        checks.append(Check("no collapse", False, None, config.max_mean_cosine,
                            f"{m} finite vectors: at least 2 are needed to measure collapse"))
    else:
        i, j = _pairs(m, config.collapse_pairs, np.random.default_rng(seed))
        denom = norms[i] * norms[j]
        cos = np.where(denom > 0, np.einsum("pd,pd->p", good[i], good[j]) / np.maximum(denom, 1e-300), 0.0)
        mean = float(cos.mean())
        checks.append(Check("no collapse", mean < config.max_mean_cosine, mean, config.max_mean_cosine,
                            f"mean cosine of {len(cos)} random item pairs {mean:.4f}, must be below "
                            f"{config.max_mean_cosine:g}"))
    return GateResult("embeddings", checks)
