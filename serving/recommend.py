"""The second stage of ``POST /recommend``: candidates from one or more generators, merged, ranked by the ranker.

Pure functions over one request (the service reads the release and the user's actions; this module never does):

- ``merge_candidates``: the candidate lists of several generators (the two-tower index, item co-occurrence, ...)
  merged and de-duplicated, each item keeping every generator that found it and that generator's score, in
  first-found order (the generators' order, then each list's), the order ties in the ranking fall back to;
- ``ranker_sequence``: the user's ranker sequence at the request time, THE definition training uses
  (``tasks/ranking_examples.sequences_at``) over the actions serving holds (the source's recent actions plus the
  live ones, as ``/retrieve`` assembles them);
- ``rank``: the release's ranker scores every candidate against that sequence (``models.ranker.score_candidates``)
  and the top k by ranking score (``Ranker.ranking_score``) come back as ``{item_id, score, heads: {click: p, ...}, sources: {generator:
  retrieval score}}``.

A candidate the ranker's item table lacks (a live item added after the release was built: ranker row 0) is scored
as the ranker's unknown item (row 0 holds no item vector), so new items are still ranked rather than dropped; its
retrieval term in the ranking score is the ``u . v`` the index found it with (``Ranker.ranking_score``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from towerflow.config import RANKER_HEADS
from towerflow.models.ranker import Ranker, score_candidates
from towerflow.tasks.history import EventArrays
from towerflow.tasks.ranking_examples import sequences_at
from towerflow.tasks.vocabulary import Vocab

TWO_TOWER = "two_tower"  # the learned retrieval generator's name in ``Candidates.sources``


@dataclass(frozen=True)
class Candidates:
    """C distinct candidate items and which generators found them."""

    item_ids: np.ndarray  # (C,) int64 raw item ids, first-found order
    sources: tuple[dict[str, float], ...]  # per item: {generator name: that generator's retrieval score}

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class RankerSequence:
    """One user's ranker sequence at one request time (``sequences_at``'s row), S slots, latest last."""

    items: np.ndarray  # (S,) int64 item indices of the release vocabulary, 0 = padding
    actions: np.ndarray  # (S,) int64 ACTION_INDEX codes, 0 = padding
    age_s: np.ndarray  # (S,) float32 seconds from each action to the request, 0 on padding


def merge_candidates(found: Mapping[str, Sequence[Mapping[str, Any]]], limit: int | None = None) -> Candidates:
    """``{generator: [{"item_id", "score"}, ...]}`` (each list best first, as ``retrieval.search`` returns items)
    -> the distinct items, in first-found order, at most ``limit`` of them (None: all)."""
    ids: list[int] = []
    sources: dict[int, dict[str, float]] = {}
    for name, items in found.items():
        for it in items:
            i = int(it["item_id"])
            if i not in sources:
                sources[i] = {}
                ids.append(i)
            sources[i].setdefault(name, float(it["score"]))  # a generator listing an item twice: its best score
    ids = ids if limit is None else ids[:limit]
    return Candidates(np.array(ids, dtype=np.int64), tuple(sources[i] for i in ids))


def ranker_sequence(actions: EventArrays, vocab: Vocab, user_id: int, request_us: int, max_seq_len: int,
                    max_history_days: int) -> RankerSequence:
    """The user's last ``max_seq_len`` history actions strictly before ``request_us``: ``sequences_at`` for one row.

    actions: history actions in time order (the source's recent ones merged with the live ones; other users' rows
    are ignored).
    """
    items, acts, age = sequences_at(actions, vocab, np.array([user_id], dtype=np.int64),
                                    np.array([request_us], dtype=np.int64), max_seq_len, max_history_days)
    return RankerSequence(items[0], acts[0], age[0])


def rank(model: Ranker, candidates: Candidates, rows: np.ndarray, surface: int, sequence: RankerSequence, k: int,
         dense: np.ndarray | None = None, user_vector: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Score the candidates and return the top ``k`` by ranking score (ties: first-found order).

    rows: (C,) each candidate's row of the ranker's item table (0: unknown to it); surface: SURFACE_INDEX;
    dense: (dense_dim,) request features when the ranker takes them; user_vector: (d,) the vector the first stage
    searched with (zeros: none) when the ranker takes the retrieval score: every candidate, whichever generator
    found it, is scored ``u . v`` against its own item vector.
    """
    if len(rows) != len(candidates):
        raise ValueError(f"rank: {len(rows)} ranker rows for {len(candidates)} candidates")
    if k < 1:
        raise ValueError(f"rank: k must be >= 1, got {k}")
    if len(candidates) == 0:
        return []
    # a candidate the ranker's table lacks (a live item, row 0) keeps the score the index found it with
    unknown_uv = np.array([src.get(TWO_TOWER, 0.0) for src in candidates.sources], dtype=np.float32)
    probs, score = score_candidates(model, np.asarray(rows, dtype=np.int64), surface, sequence.items,
                                    sequence.actions, sequence.age_s, dense, user_vector, unknown_uv)
    top = np.argsort(-score, kind="stable")[:k]
    heads = probs[top].tolist()
    return [{"item_id": int(candidates.item_ids[j]), "score": float(score[j]),
             "heads": dict(zip(RANKER_HEADS, h, strict=True)), "sources": candidates.sources[j]}
            for j, h in zip(top.tolist(), heads, strict=True)]
