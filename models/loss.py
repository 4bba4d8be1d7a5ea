"""Sampled softmax over in-batch candidates with logQ correction (Yi et al., RecSys 2019), accidental-hit
masking, and optional mixed negatives (Yang et al., WWW 2020).

Row i of a batch has user vector u_i and positive item v_i; every other row's positive is a negative for it.
Popular items show up as in-batch negatives more often than under a full softmax, so each candidate column's
logit is corrected by its log sampling probability: ``logit_ij = u_i . v_j / temperature - log q_j``.

On the scale of log q: with in-batch columns only, any constant added to every log q cancels in the softmax, so
the per-example log probability (``StreamingFrequencyEstimator.log_probability`` or ``exact_log_q``) is enough.
With mixed negatives both kinds of column must be on one scale, the expected number of copies of the candidate
among the columns of its kind: ``log(b * p_j)`` for in-batch columns of a batch of b, and
``mixed_negatives_log_q(m, n_items)`` = ``log(m / n_items)`` for m uniform samples from n_items.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from towerflow.errors import TowerflowError


class LossInputError(TowerflowError, ValueError):
    """Inputs to the loss have inconsistent shapes or values."""


def softmax_logits(
    u: torch.Tensor,
    v: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
    neg_v: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Corrected, masked logits (b, b + m); column i of row i is its positive.

    u (b, dim) user vectors; v (b, dim) their positive items; item_ids (b,) those items' ids (to find
    accidental hits); log_q (b,) log q of each in-batch column, or None to turn the correction off;
    neg_v (m, dim), neg_ids (m,), neg_log_q (m,) optional mixed negatives (neg_log_q required iff log_q is given).
    A column whose item equals the row's positive (other than the diagonal) is set to -inf.
    """
    b = u.shape[0]
    if v.shape != u.shape or item_ids.shape != (b,):
        raise LossInputError(
            f"u {tuple(u.shape)} and v {tuple(v.shape)} must both be (b, dim) and item_ids (b,), "
            f"got item_ids {tuple(item_ids.shape)}"
        )
    if temperature <= 0:
        raise LossInputError(f"temperature must be > 0, got {temperature}")
    _check_log_q("log_q", log_q, b)

    hit = item_ids.unsqueeze(1) == item_ids.unsqueeze(0)  # (b, b)
    hit.fill_diagonal_(False)
    logits = _corrected_scores(u, v, temperature, log_q, hit)  # (b, b)
    if neg_v is None:
        if neg_ids is not None or neg_log_q is not None:
            raise LossInputError("neg_ids / neg_log_q given without neg_v")
        return logits

    m = neg_v.shape[0]
    if neg_v.dim() != 2 or neg_v.shape[1] != u.shape[1] or neg_ids is None or neg_ids.shape != (m,):
        raise LossInputError(f"mixed negatives need neg_v (m, {u.shape[1]}) and neg_ids (m,)")
    if (log_q is None) != (neg_log_q is None):
        raise LossInputError(
            "logQ correction must be on or off for both columns: pass log_q and neg_log_q, or neither"
        )
    _check_log_q("neg_log_q", neg_log_q, m)
    neg_logits = _corrected_scores(u, neg_v, temperature, neg_log_q, item_ids.unsqueeze(1) == neg_ids.unsqueeze(0))
    return torch.cat([logits, neg_logits], dim=1)


def _corrected_scores(
    u: torch.Tensor, v: torch.Tensor, temperature: float, log_q: torch.Tensor | None, hit: torch.Tensor
) -> torch.Tensor:
    """u (b, dim) . v (n, dim) / temperature - log_q (n,), -inf where hit (b, n) -> (b, n).

    The correction and the mask form one constant (b, n) bias that addmm adds to the products: one (b, n) autograd
    op instead of four (matmul, divide, subtract, masked fill), each with a backward pass over (b, n).
    """
    shift = torch.zeros((), dtype=u.dtype, device=u.device) if log_q is None else -log_q.to(u.dtype).unsqueeze(0)
    bias = torch.where(hit, float("-inf"), shift)  # (b, n)
    return torch.addmm(bias, u / temperature, v.T)  # u scaled, (b, dim): a tiny temperature overflows alpha


def in_batch_softmax_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Mean cross-entropy of each row against its diagonal column -> scalar.

    Takes ``softmax_logits``'s arguments (u, v, item_ids, log_q, temperature and the optional mixed negatives),
    documented and checked there, and passes them on unchanged: one signature, so the two cannot drift apart.
    """
    logits = softmax_logits(*args, **kwargs)  # (b, b + m)
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def mixed_negatives_log_q(n_negatives: int, n_items: int) -> float:
    """log q of a uniform negative: expected copies of one item among n_negatives draws from n_items."""
    if n_negatives < 1 or n_items < 1:
        raise LossInputError(f"need n_negatives >= 1 and n_items >= 1, got {n_negatives}, {n_items}")
    return math.log(n_negatives / n_items)


def _check_log_q(name: str, t: torch.Tensor | None, n: int) -> None:
    if t is None:
        return
    if t.shape != (n,):
        raise LossInputError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise LossInputError(f"{name} has NaN or inf (a zero probability?): floor q before taking the log")
