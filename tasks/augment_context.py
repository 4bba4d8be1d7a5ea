"""Synthetic pseudo-context (Pinterest ads retrieval): teach the context layer on rows that have no real context.

Most positive actions happen on surfaces without a viewed item (homefeed, search), so few training rows exercise the
context input. For a row with no real context, with probability ``pseudo_context_prob``, we set its context to an
item related to its target (the positive conversion / engagement event), found in this order:

1. session: another item the same user engaged with positively within ``session_gap_s`` seconds of the target (up
   to 4 engagements away on each side), provided the pair is corroborated: the target was co-engaged with it in at
   least ``MIN_SESSION_SUPPORT`` sessions over all users. Among corroborated ones, the best supported wins, then the
   nearest (the previous engagement first, like the item viewed before acting on ``related``). The corroboration
   filters the noise of sessions that mix interests: on the synthetic world an uncorroborated nearest neighbour
   shares the target's topic about half the time, a corroborated one about 4 times in 5;
2. co-engagement: else the item most often co-engaged in a session with the target, over every user;
3. content: else the target's nearest content neighbour, an item of the same category, nearest by cosine of the
   dense features when the catalog has them, else drawn at random from the category.

Pseudo-queries are the search counterpart: a row with neither context nor query gets, with probability
``pseudo_query_prob``, a query made of the words of its target's title and category (``Examples.item_text``), each
word dropped with probability ``query_word_dropout`` (one is always kept, in order), so the shared text bag learns
that words a user types lead to the items that carry them. Drawn independently of the pseudo-context.

The pseudo-context is never the target itself. Only positive events of the training split are used (the training
rows themselves), so no holdout event can leak into training through a pseudo-context, whatever the split.
Deterministic for a given seed. Rows with real context (or a real query) are never touched, and histories are never
changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from towerflow.config import AugmentConfig
from towerflow.models.batch import ItemFeatures
from towerflow.models.query import encode_texts, pad_columns, texts_differ, words
from towerflow.tasks.build_examples import SequenceExamples

SESSION_NEIGHBOURS = 4  # positive events looked at on each side of the target in the user's timeline
MIN_SESSION_SUPPORT = 2  # sessions (over all users) in which a pair must co-occur to count as related
SIMS_BUDGET = 1 << 24  # floats per block of content similarities


@dataclass(frozen=True)
class AugmentStats:
    """What ``augment_context`` did; ``n_session + n_cooccur + n_content`` rows got a pseudo-context."""

    n_rows: int
    n_eligible: int  # rows without real context
    n_drawn: int  # eligible rows drawn with probability p
    n_session: int
    n_cooccur: int
    n_content: int
    n_none: int  # drawn, but no related item was found
    n_pseudo_query: int = 0  # rows given a pseudo-query

    @property
    def n_augmented(self) -> int:
        return self.n_session + self.n_cooccur + self.n_content

    @property
    def rate(self) -> float:
        """Share of eligible rows that got a pseudo-context (about p when related items are found)."""
        return self.n_augmented / self.n_eligible if self.n_eligible else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "n_augmented": self.n_augmented, "rate": self.rate}


def _session_candidates(train: SequenceExamples, gap_s: int) -> np.ndarray:
    """(n, 2K) candidate items per row, in order of preference (-1, +1, -2, +2, ... positions away in the user's
    timeline): the same user's positives in the session, 0 where not valid."""
    order = np.lexsort((train.ts, train.user_idx))
    user, ts, item = train.user_idx[order], train.ts[order], train.target_items[order]
    n, k = len(order), SESSION_NEIGHBOURS
    offsets = np.stack([-np.arange(1, k + 1), np.arange(1, k + 1)], axis=1).ravel()  # -1, +1, -2, +2, ...
    pos = np.arange(n)[:, None] + offsets[None, :]  # (n, 2K) in user/time order
    inside = (pos >= 0) & (pos < n)
    pos = np.clip(pos, 0, max(n - 1, 0))
    valid = (
        inside
        & (user[pos] == user[:, None])
        & (user[:, None] > 0)  # index 0 pools every unknown user: not one session
        & (np.abs(ts[pos] - ts[:, None]) <= gap_s)
        & (item[pos] != item[:, None])
    )
    cand = np.zeros((n, 2 * k), dtype=np.int64)
    cand[order] = np.where(valid, item[pos], 0)  # back to the rows' own order
    return cand


def _pair_counts(targets: np.ndarray, cand: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys ``target * (n_items + 1) + partner`` of session co-engagements, and how many rows hold each."""
    m = np.int64(n_items + 1)
    a = np.broadcast_to(targets[:, None], cand.shape)[cand > 0]
    return np.unique(a * m + cand[cand > 0], return_counts=True)


def _support(targets: np.ndarray, cand: np.ndarray, keys: np.ndarray, counts: np.ndarray, n_items: int) -> np.ndarray:
    """(n, 2K) number of sessions in which each (target, candidate) pair was co-engaged; 0 for empty slots."""
    if len(keys) == 0:
        return np.zeros(cand.shape, dtype=np.int64)
    key = targets[:, None] * np.int64(n_items + 1) + cand
    pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
    return np.where((cand > 0) & (keys[pos] == key), counts[pos], 0)


def _most_coengaged(keys: np.ndarray, counts: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items + 1,) for each item, the item most often co-engaged with it in a session (0 when none)."""
    m = np.int64(n_items + 1)
    best = np.zeros(n_items + 1, dtype=np.int64)
    if len(keys):
        # sort by (item, count desc, partner asc); the first entry of each item is its best partner
        src, dst = keys // m, keys % m
        o = np.lexsort((dst, -counts, src))
        first = np.unique(src[o], return_index=True)[1]
        best[src[o][first]] = dst[o][first]
    return best


def _content_neighbours(targets: np.ndarray, item_feats: ItemFeatures, rng: np.random.Generator) -> np.ndarray:
    """For each target, an item of the same category (nearest by dense cosine when present); 0 when none."""
    category = item_feats.category.numpy()
    dense = None
    if item_feats.dense is not None:
        dense = item_feats.dense.numpy().astype(np.float32)
        dense = dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
    out = np.zeros(len(targets), dtype=np.int64)
    for c in np.unique(category[targets]):
        if c == 0:
            continue  # unknown category: no content relation
        members = np.flatnonzero(category == c)
        members = members[members > 0]
        rows = np.flatnonzero(category[targets] == c)
        if len(members) < 2:
            continue
        t = targets[rows]
        if dense is not None:
            uniq, inverse = np.unique(t, return_inverse=True)
            best = np.zeros(len(uniq), dtype=np.int64)
            step = max(1, SIMS_BUDGET // len(members))  # bounded (step, members) similarity blocks
            for lo in range(0, len(uniq), step):
                u = uniq[lo : lo + step]
                sims = dense[u] @ dense[members].T  # cosine
                sims[u[:, None] == members[None, :]] = -np.inf
                best[lo : lo + step] = members[np.argmax(sims, axis=1)]
            out[rows] = best[inverse]
        else:
            # uniform over the category without the target: draw among len - 1 slots and skip the target's own
            draw = rng.integers(0, len(members) - 1, size=len(rows))
            self_pos = np.searchsorted(members, t)
            out[rows] = members[draw + (draw >= self_pos)]
    return out


def pseudo_queries(
    targets: np.ndarray, item_text: Sequence[str], word_dropout: float, rng: np.random.Generator
) -> list[str]:
    """For each target item index, its text (title + category) with each word dropped with probability
    ``word_dropout``; the words left keep their order, and an item whose words were all dropped keeps one at random.
    An item without text gives ''."""
    out = []
    cache: dict[int, list[str]] = {}
    for t in targets.tolist():
        ws = cache.get(t)
        if ws is None:
            ws = cache[t] = words(item_text[t])
        if not ws:
            out.append("")
            continue
        keep = rng.random(len(ws)) >= word_dropout
        if not keep.any():
            keep[rng.integers(len(ws))] = True
        out.append(" ".join(w for w, k in zip(ws, keep, strict=True) if k))
    return out


def augment_context(
    train: SequenceExamples,
    item_feats: ItemFeatures,
    config: AugmentConfig | None = None,
    item_text: Sequence[str] | None = None,
) -> tuple[SequenceExamples, AugmentStats]:
    """A new ``train`` where drawn context-less rows carry a pseudo-context item (and, given ``item_text``, a
    pseudo-query), and what was done.

    Only ``context_items`` (and ``query``) are new arrays; the others are shared with ``train`` (neither is modified).

    item_feats: the catalog (category (n_items + 1,), optional dense (n_items + 1, D)) for the content fallback.
    item_text: row i = item index i's title + category (``Examples.item_text``); None, or texts that tell no two
    items apart (``texts_differ``): no pseudo-queries.
    """
    config = config or AugmentConfig()
    rng = np.random.default_rng(config.seed)
    n_items = item_feats.category.shape[0] - 1
    eligible = train.context_items == 0
    drawn = eligible & (rng.random(len(train)) < config.pseudo_context_prob)
    rows = np.flatnonzero(drawn)
    targets = train.target_items[rows]

    cand = _session_candidates(train, config.session_gap_s)
    keys, counts = _pair_counts(train.target_items, cand, n_items)
    # session: the best-supported corroborated candidate; ties go to the earlier column (the nearer engagement)
    support = _support(targets, cand[rows], keys, counts, n_items)
    pick = np.argmax(support * (2 * SESSION_NEIGHBOURS) - np.arange(cand.shape[1]), axis=1) if len(rows) else rows
    ok = support[np.arange(len(rows)), pick] >= MIN_SESSION_SUPPORT
    session = np.where(ok, cand[rows, pick] if len(rows) else rows, 0)

    cooccur = _most_coengaged(keys, counts, n_items)[targets]
    cooccur = np.where(session == 0, cooccur, 0)  # never the target: pairs of an item with itself are not kept
    need = (session == 0) & (cooccur == 0)
    content = np.zeros(len(rows), dtype=np.int64)
    content[need] = _content_neighbours(targets[need], item_feats, rng)

    chosen = np.where(session > 0, session, np.where(cooccur > 0, cooccur, content))
    context = train.context_items.copy()
    context[rows] = chosen
    query = train.query
    n_query = 0
    if item_text is not None and config.pseudo_query_prob > 0 and texts_differ(item_text):
        # drawn after the pseudo-contexts, from the same generator: adding queries leaves those draws unchanged
        q_eligible = eligible & ~(train.query > 0).any(axis=1)
        q_rows = np.flatnonzero(q_eligible & (rng.random(len(train)) < config.pseudo_query_prob))
        hashes = encode_texts(pseudo_queries(train.target_items[q_rows], item_text, config.query_word_dropout, rng))
        width = max(query.shape[1], hashes.shape[1])
        query = pad_columns(query, width).copy()
        query[q_rows] = pad_columns(hashes, width)
        n_query = int((hashes > 0).any(axis=1).sum())
    stats = AugmentStats(
        n_rows=len(train),
        n_eligible=int(eligible.sum()),
        n_drawn=len(rows),
        n_session=int((session > 0).sum()),
        n_cooccur=int((cooccur > 0).sum()),
        n_content=int((need & (content > 0)).sum()),
        n_none=int((chosen == 0).sum()),
        n_pseudo_query=n_query,
    )
    return replace(train, context_items=context, query=query), stats
