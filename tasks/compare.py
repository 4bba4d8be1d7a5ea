"""The evaluate stage's logic: the candidate, the baselines and the champion ranked on ONE holdout.

The champion is scored through its own vocabulary: the holdout (built with the candidate's vocabulary) is
re-expressed in the champion's through the raw ids (``tasks.scoring.remap_examples``), and the champion's user
features are rebuilt from the same users table, so both models answer the same requests and items the champion
never saw are honest misses. The flow's ``evaluate`` task and ``bench/retrain_e2e.py`` both call this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from towerflow.config import EvalConfig
from towerflow.models.two_tower import TwoTower
from towerflow.tasks.build_examples import Examples
from towerflow.tasks.evaluate import baseline_ranks, evaluate_slices, metrics_from_ranks
from towerflow.tasks.scoring import model_ranks, remap_examples
from towerflow.tasks.vocabulary import Vocab, user_features

Metrics = dict[str, float]
Slices = dict[str, Metrics]


@dataclass
class Evaluation:
    """Holdout metrics (``recall@K``, ``ndcg@K``, ``hr@K``, ``n``) and per-slice metrics of every model compared."""

    candidate: Metrics
    slices: Slices
    baselines: dict[str, Metrics]
    baseline_slices: dict[str, Slices]
    champion: Metrics | None = None
    champion_slices: Slices | None = None
    champion_version: int | None = None
    champion_release: str | None = None


def evaluate_candidate(model: TwoTower, examples: Examples, config: EvalConfig, refit: bool = False) -> Evaluation:
    """The candidate and the popularity / co-occurrence baselines on ``examples.holdout`` (seen items excluded).

    ``refit``: the candidate was refit on train + validation rows; the baselines are fitted on the same rows."""
    ks, short = config.ks, config.short_history_max
    ranks = model_ranks(model, examples.holdout, examples.user_feats, examples.holdout_seen)
    base = baseline_ranks(examples, refit_rows=refit)
    return Evaluation(
        candidate=metrics_from_ranks(ranks, ks), slices=evaluate_slices(ranks, examples.holdout, ks, short),
        baselines={n: metrics_from_ranks(r, ks) for n, r in base.items()},
        baseline_slices={n: evaluate_slices(r, examples.holdout, ks, short) for n, r in base.items()})


def score_champion(model: TwoTower, vocab: Vocab, examples: Examples, users: pd.DataFrame,
                   config: EvalConfig) -> tuple[Metrics, Slices]:
    """(metrics, slices) of the champion's ``model`` on the candidate's holdout, through the champion's ``vocab``.

    ``users``: the snapshot's users table, from which the champion's user features are built.
    """
    ks, short = config.ks, config.short_history_max
    seq, seen = remap_examples(examples.holdout, examples.holdout_seen, examples.vocab, vocab)
    ranks = model_ranks(model, seq, user_features(users, vocab), seen)
    return metrics_from_ranks(ranks, ks), evaluate_slices(ranks, seq, ks, short)
