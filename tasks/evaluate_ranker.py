"""Ranking metrics on held-out request slates: per-head AUC, per-user GAUC and HIT@3 per head.

Definitions (n rows = (request, shown item) pairs, labels (n, H) in RANKER_HEADS order):

- **AUC of head h**: the probability that a random row positive for h scores above a random row negative for h
  (ties count one half), over all rows; ``nan`` when h has no positive or no negative row.
- **GAUC of head h** (Zhou et al., DIN): the AUC of h within each user's rows, averaged over the users whose rows
  hold both classes, each weighted by their number of rows.
- **HIT@3 of head h** (TransAct, section 4): each request's shown items are ranked by the request score (the
  ranking score for a ranker, ``Ranker.ranking_score``: the order serving shows); ``HIT@3_h = (h-positive rows
  ranked in the top 3 of their request) / (all h-positive rows)``. Higher is better for click, save and
  conversion; lower is better for skip and hide (a ranker that pushes what users hide out of the top slots). Ties
  in score keep the rows' order.

A head's AUC and GAUC read that head's own score when one is given (a ranker's head probabilities), else the
request score, negated for the negative heads (skip, hide), so a single-score baseline is judged on each head.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from towerflow.config import RANKER_HEADS
from towerflow.contract import NEGATIVE_ACTIONS

TOP = 3


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """(n,) 0/1 labels, (n,) scores -> ROC AUC with ties counted one half (Mann-Whitney); nan if one class."""
    y = np.asarray(labels) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks of ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Per-user AUC averaged with weights = the user's rows, over users whose rows hold both classes; nan if none."""
    order = np.argsort(users, kind="stable")
    u, y, s = users[order], np.asarray(labels)[order], np.asarray(scores)[order]
    bounds = np.flatnonzero(np.r_[True, u[1:] != u[:-1], True])
    total = weight = 0.0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        value = auc(y[a:b], s[a:b])
        if not np.isnan(value):
            total += value * (b - a)
            weight += b - a
    return total / weight if weight else float("nan")


def hit_at_k(labels: np.ndarray, scores: np.ndarray, request: np.ndarray, k: int = TOP) -> float:
    """Share of positive rows ranked in the top k of their request by score (ties keep row order); nan if none."""
    y = np.asarray(labels) > 0.5
    if not y.any():
        return float("nan")
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64), request))
    req = request[order]
    first = np.r_[0, np.flatnonzero(req[1:] != req[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    return float((y[order] & (rank < k)).sum() / y.sum())


def evaluate_ranking(labels: np.ndarray, request: np.ndarray, user: np.ndarray, score: np.ndarray,
                     head_scores: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of the module docstring -> ``{"auc/click": ..., "gauc/click": ..., "hit@3/click": ...,
    "auc/mean": mean AUC over heads that have one}``.

    labels (n, H), request (n,), user (n,), score (n,) the request score; head_scores (n, H) or None.
    """
    out: dict[str, float] = {}
    for h, head in enumerate(RANKER_HEADS):
        sign = -1.0 if head in NEGATIVE_ACTIONS else 1.0
        s = head_scores[:, h] if head_scores is not None else sign * score
        out[f"auc/{head}"] = auc(labels[:, h], s)
        out[f"gauc/{head}"] = gauc(labels[:, h], s, user)
        out[f"hit@{TOP}/{head}"] = hit_at_k(labels[:, h], score, request)
    aucs = [out[f"auc/{h}"] for h in RANKER_HEADS if not np.isnan(out[f"auc/{h}"])]
    out["auc/mean"] = float(np.mean(aucs)) if aucs else float("nan")
    return out
