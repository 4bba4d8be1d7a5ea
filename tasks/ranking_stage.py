"""The retrain's ranking stage as pure functions: which requests train and judge the ranker, and how the candidate
ranker, the baselines and the champion's ranker are scored on the same held-out requests.

- **Split** (``ranking_data``): a time split like the retriever's: requests in the last ``holdout_days`` of the window
  are held out (the latest ``max_holdout_requests`` of them), the latest ``max_train_requests`` before that train.
  Sequences come from every event of the snapshot before each request (tasks/ranking_examples.py).
- **Baselines** on the held-out rows: ``popularity`` (the item's positive engagements before the holdout) and
  ``profile_dot``, the retrieval-score stand-in: the user's profile (mean item vector of their positives before the
  request's day, over the candidate release's item vectors) dot the candidate's vector.
- **Champion**: the champion release's ranker, on examples built from the same events through ITS vocabulary and
  sequence length; both rankers are compared on the (request, item) rows both can score (items new to the candidate's
  window are unknown to the champion).

A ranker learns from what users did NOT want as much as from what they did: ``has_negatives`` asks for ``impression``
rows (shown, not engaged with) or negative actions (``skip``, ``hide``: MovieLens' 1-2 stars). An implicit file
(every row a click) has neither, so the flow skips the ranking stages there (retrieval candidates as the shown items,
the issue's plan for such sources, are not built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from towerflow.config import RankerStageConfig
from towerflow.contract import NEGATIVE_ACTIONS, POSITIVE_ACTIONS
from towerflow.tasks.evaluate_ranker import evaluate_ranking
from towerflow.tasks.history import HistorySpec
from towerflow.tasks.ranking_examples import (
    RankingExamples,
    _request_keys,
    build_ranking_examples,
    user_profiles,
    with_retrieved_candidates,
)
from towerflow.tasks.request_vectors import Retriever
from towerflow.tasks.train_ranker import evaluate_ranker, predict, ranking_score
from towerflow.tasks.vocabulary import Vocab, user_features

DAY_US = 86_400_000_000


@dataclass
class RankingData:
    """The stage's examples: ``train`` before ``cut_us``, ``holdout`` at or after it (both renumbered from 0)."""

    train: RankingExamples
    holdout: RankingExamples
    cut_us: int


@dataclass
class RankerEvaluation:
    """Metrics (tasks/evaluate_ranker.py names) on the held-out requests."""

    candidate: dict[str, float]
    baselines: dict[str, dict[str, float]]
    n_rows: int
    n_requests: int
    champion: dict[str, float] | None = None  # the champion's ranker on the rows both rankers score
    candidate_on_shared: dict[str, float] | None = None  # the candidate on those same rows
    champion_release: str | None = None
    champion_version: int | None = None  # the registered version judged against (a promotion's compare-and-set)
    n_shared_rows: int = 0
    notes: list[str] = field(default_factory=list)


def has_negatives(events: pd.DataFrame) -> bool:
    """Whether the events hold negatives for the ranker: ``impression`` rows or negative actions (skip, hide)."""
    return bool(events["action"].isin(("impression", *NEGATIVE_ACTIONS)).any())


def _latest(ex: RankingExamples, n_requests: int | None) -> RankingExamples:
    """The rows of the latest ``n_requests`` requests (all when None), requests renumbered from 0."""
    if len(ex) == 0:
        return ex
    first = int(ex.request.min())
    if n_requests is not None:
        first = max(first, int(ex.request.max()) + 1 - n_requests)
    ex = ex.take(ex.request >= first)
    ex.request = ex.request - first
    return ex


def _event_us(events: pd.DataFrame) -> np.ndarray:
    return pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8


def _start_of_latest(events: pd.DataFrame, before_us: int, n_requests: int | None) -> int | None:
    """The time of the ``n_requests``-th latest request before ``before_us`` (None: all), so only those are built."""
    if n_requests is None:
        return None
    ts = _event_us(events)
    first = pd.Series(ts).groupby(_request_keys(events)).min().to_numpy()  # a request's time: its earliest row
    first = np.sort(first[first < before_us])
    return int(first[-n_requests]) if len(first) > n_requests else None


def ranking_data(events: pd.DataFrame, vocab: Vocab, config: RankerStageConfig, window_end_us: int,
                 max_history_days: int, retriever: Retriever | Callable[[], Retriever] | None = None) -> RankingData:
    """Training and held-out ranking examples of a snapshot's ``events`` (module docstring, "Split").

    ``retriever``: the candidate release's (or a function returning it, called only when there is something to
    train on), for each request's user vector (the ranker's retrieval score); required when
    ``config.train.model.retrieval_score``."""
    cut = int(window_end_us) - config.holdout_days * DAY_US
    s = config.train.model.max_seq_len
    r = None
    # no event before the held-out days: no training request, no ranker (the stage skips), no vectors needed
    if config.train.model.retrieval_score and (_event_us(events) < cut).any():
        r = retriever() if callable(retriever) else retriever
        if r is None:
            raise ValueError("ranking_data: the ranker takes the retrieval score (ranker.train.model.retrieval_score) "
                             "but no retriever was given to compute each request's user vector")
    train = build_ranking_examples(events, vocab, s, max_history_days, end_us=cut,
                                   start_us=_start_of_latest(events, cut, config.max_train_requests), retriever=r)
    holdout = build_ranking_examples(events, vocab, s, max_history_days, start_us=cut, retriever=r)
    train = _latest(train, config.max_train_requests)
    if r is not None and config.retrieved_negatives:  # training only: the gate judges the shown slates
        train = with_retrieved_candidates(train, r.item_table.numpy(), config.retrieved_negatives,
                                          config.retrieved_depth, seed=config.train.seed)
    return RankingData(train, _latest(holdout, config.max_holdout_requests), cut)


def popularity(events: pd.DataFrame, vocab: Vocab, before_us: int) -> np.ndarray:
    """(n_items + 1,) positive engagements of each vocabulary item strictly before ``before_us`` (row 0: 0)."""
    ts = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8
    keep = events["action"].isin(POSITIVE_ACTIONS).to_numpy() & (ts < before_us)
    counts = np.bincount(vocab.item_index(events["item_id"].to_numpy(dtype=np.int64)[keep]),
                         minlength=vocab.n_items + 1).astype(np.float64)
    counts[0] = 0.0  # items outside the vocabulary all map to row 0: not one popular item
    return counts


def baseline_scores(events: pd.DataFrame, vocab: Vocab, item_table: np.ndarray, ex: RankingExamples,
                    before_us: int) -> dict[str, np.ndarray]:
    """Each baseline's (n,) request score of the rows of ``ex``; item_table: (n_items + 1, D), row 0 padding."""
    profile = user_profiles(events, vocab, item_table, ex.user_id, ex.ts_us - ex.ts_us % DAY_US)
    return {"popularity": popularity(events, vocab, before_us)[ex.item],
            "profile_dot": np.einsum("nd,nd->n", profile, np.asarray(item_table)[ex.item])}


def champion_retriever(release: Any, vocab: Vocab, users: pd.DataFrame | None) -> Retriever:
    """A loaded release's retriever (``infra.releases.LoadedRelease``: its model, item vectors, config.json) over its
    vocabulary, with the demographics of ``users`` (None: every user unknown, as serving without a users table)."""
    rows = release.ranker_rows(vocab.item_ids)
    if (rows == 0).any():
        raise ValueError(f"release {release.release_id}: {int((rows == 0).sum())} vocabulary items have no vector")
    feats = (user_features(users, vocab) if users is not None
             else np.zeros((vocab.n_users + 1, len(vocab.demographic_fields)), np.int64))
    return Retriever.of(release.model, np.asarray(release.item_vectors)[rows - 1], feats,
                        HistorySpec.from_release_config(release.release_id, release.config))


def _row_keys(ex: RankingExamples, vocab: Vocab) -> pd.DataFrame:
    return pd.DataFrame({"user_id": ex.user_id, "ts_us": ex.ts_us, "surface": ex.surface,
                         "item_id": vocab.item_ids[ex.item - 1], "row": np.arange(len(ex))})


def evaluate_ranking_stage(model: Any, data: RankingData, events: pd.DataFrame, vocab: Vocab,
                           item_table: np.ndarray, max_history_days: int,
                           champion: Any | None = None, users: pd.DataFrame | None = None) -> RankerEvaluation:
    """Score the candidate ``model``, the baselines and (when given) the champion release's ranker on the holdout.

    ``champion``: a loaded release (``infra.releases.LoadedRelease``) whose ``ranker`` is not None; its vocabulary is
    read from its ``vocab_dir``. A champion ranker that takes dense features (none of this flow's do) is skipped.
    One with the retrieval score gets its user vectors from the champion's own retriever (``champion_retriever``,
    demographics from ``users``).
    """
    ex = data.holdout
    ev = RankerEvaluation(candidate=evaluate_ranker(model, ex), baselines={}, n_rows=len(ex),
                          n_requests=ex.n_requests)
    for name, score in baseline_scores(events, vocab, item_table, ex, data.cut_us).items():
        ev.baselines[name] = evaluate_ranking(ex.labels, ex.request, ex.user_id, score)
    if champion is not None:
        ev.champion_release, ev.champion_version = champion.release_id, getattr(champion, "version", None)
    if champion is None or champion.ranker is None or len(ex) == 0:
        return ev
    ranker = champion.ranker
    if ranker.dense_dim:
        ev.notes.append(f"champion {champion.release_id}'s ranker takes dense features: not compared")
        return ev
    champ_vocab = Vocab.from_json((champion.vocab_dir / "vocab.json").read_text())
    champ_ex = build_ranking_examples(events, champ_vocab, ranker.cfg.max_seq_len, max_history_days,
                                      start_us=int(ex.ts_us.min()), end_us=int(ex.ts_us.max()) + 1,
                                      retriever=champion_retriever(champion, champ_vocab, users)
                                      if ranker.cfg.retrieval_score else None)
    shared = _row_keys(ex, vocab).merge(_row_keys(champ_ex, champ_vocab), on=["user_id", "ts_us", "surface",
                                                                             "item_id"], suffixes=("", "_champ"))
    ev.n_shared_rows = len(shared)
    if not len(shared):
        ev.notes.append(f"champion {champion.release_id}'s ranker knows none of the held-out items")
        return ev
    mine, theirs = ex.take(shared["row"].to_numpy()), champ_ex.take(shared["row_champ"].to_numpy())
    ev.candidate_on_shared = evaluate_ranker(model, mine)
    probs = predict(ranker, theirs)
    score = ranking_score(ranker, theirs, probs)
    ev.champion = evaluate_ranking(mine.labels, mine.request, mine.user_id, score, probs)
    return ev
