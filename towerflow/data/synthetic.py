"""The synthetic world: the embedded default event source and the test bed (docs/architecture.md, "Data contract").

What is planted, so that later stages have something measurable to learn:

- **Topics.** ``n_topics`` topics named ``topic_00`` ...; each has a few made-up words, used as its sub-genres
  and in search queries. Every item lives in one topic (``category``) at a latent angle on a circle inside it;
  its sub-genre (``genres``) is the arc of the circle it sits on and its dense ``features`` are a noisy point
  near the topic centroid that also encodes the angle, so a brand-new item has a content signal.
- **Popularity.** Within a topic, item weights follow a Zipf law (``popularity_exponent``); items are boosted
  for their first days (``FRESH_BOOST`` decaying with ``FRESH_DAYS``), so new items are engaged soon after they
  appear.
- **Users.** Each has ``interests_per_user`` distinct topics with Dirichlet weights and an activity level
  (log-normal, so a few users are heavy); demographics lean weakly on the first interest. Each day a user swaps
  one interest for a new topic with probability ``drift_per_day``.
- **Sessions.** Events come in sessions of a few minutes. ``homefeed`` follows the user's interests (with some
  exploration), ``search`` carries a query of topic words and returns items of that topic, and ``related``
  shows items next to the viewed item (``context_item_id``): most are its neighbours on the topic circle,
  so the context predicts the next engagement far better than chance. A positive action usually opens the
  engaged item on ``related``; some sessions enter ``related`` from outside (a shared link) on an item that
  need not be in the user's history, which is where a context-aware model beats a history-only one.
- **Actions.** Items matching the user's interests or the session's intent (the query's topic, the viewed
  item's topic) are mostly impressions and clicks, sometimes saves and conversions; other items are mostly
  skips and hides. About a third of events are positive.

- **Slates** (``slate_size`` > 1; the default 1 writes the worlds of earlier versions byte for byte). Each session
  step is one request that shows ``slate_size`` items at once, grouped by ``request_id``: the first as above, the
  others from generators that ignore the session (half the user's interests, half the global prior). Each session
  is about one topic (an interest, or with ``SESSION_EXPLORE`` another topic; then whatever the user engages with):
  items of that topic are engaged as affine items, items of the user's other interests much less (``MID_ACTIONS``),
  others rarely. A daily profile knows the interests; only the session's recent actions tell which one is live,
  the short-term signal a realtime sequence model (TransAct) exploits.

Generation is vectorized per day (a loop over positions in a session, never over events), streams one day at a
time through ``ParquetSink`` and is byte-for-byte deterministic per config.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from towerflow.config import WorldConfig
from towerflow.contract import ACTIONS, POSITIVE_ACTIONS, SURFACES
from towerflow.data.source import ParquetSink
from towerflow.errors import TowerflowError
from towerflow.progress import progress, say

US_PER_DAY = 86_400 * 1_000_000
US_PER_S = 1_000_000

WORDS_PER_TOPIC = 4  # sub-genres per topic; also the query vocabulary of the topic
MAX_SESSION_LEN = 30
SESSION_GAP_S = (1.0, 20.0, 120.0)  # min, mean, max seconds between two events of a session
FRESH_BOOST, FRESH_DAYS = 20.0, 2.0  # a new item's weight is x(1 + 20 e^(-age/2 days))
ITEM_HISTORY_DAYS, SIGNUP_HISTORY_DAYS = 365, 730

# First event of a session: homefeed, search, or related entered from outside on an arbitrary item.
ENTRY_PROBS = {"homefeed": 0.45, "search": 0.20, "related": 0.35}
EXPLORE = 0.25  # homefeed: chance the topic is drawn from the global prior rather than the user's interests
RELATED_NEIGHBOUR, RELATED_SAME_TOPIC = 0.70, 0.10  # related: neighbour of the context / popular in its topic
NEIGHBOUR_P = 0.45  # neighbour offset on the topic circle is +-Geometric(0.45): mostly 1..3 steps away
OPEN_RELATED = 0.65  # after a positive action: open the engaged item on related
STAY_RELATED, STAY_SEARCH, HOMEFEED_TO_SEARCH = 0.60, 0.70, 0.10  # after a non-positive action
SLATE_INTEREST = 0.5  # slate_size > 1: a slot after the first is of the user's interests, else of the prior

# Action probabilities in ACTIONS order (impression, click, save, conversion, skip, hide).
AFFINE_ACTIONS = np.array([0.56, 0.28, 0.08, 0.04, 0.03, 0.01])
OTHER_ACTIONS = np.array([0.43, 0.05, 0.01, 0.01, 0.40, 0.10])
MID_ACTIONS = np.array([0.58, 0.07, 0.015, 0.005, 0.27, 0.06])  # slates: the user's interests outside the session's
SESSION_EXPLORE = 0.3  # slates: chance a session is about a topic outside the user's interests (short-term only)

COUNTRIES = ("us", "gb", "de", "fr", "br", "in", "jp", "mx")
COUNTRY_PROBS = np.array([0.30, 0.10, 0.10, 0.08, 0.12, 0.15, 0.08, 0.07])
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("f", "m", "x")
SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "to", "su", "del", "ni", "po",
             "ta", "ber", "go", "li", "mar", "sa", "dro", "fen", "ki", "ul")

_POSITIVE_CODES = np.array([ACTIONS.index(a) for a in POSITIVE_ACTIONS])
_HOME, _SEARCH, _RELATED = (SURFACES.index(s) for s in ("homefeed", "search", "related"))


@dataclass(frozen=True)
class WorldSummary:
    """What ``generate_world`` wrote."""

    path: str
    users: int
    items: int
    days: int
    events: int
    actions: dict[str, int]
    surfaces: dict[str, int]
    seconds: float
    start: date = date(2026, 1, 1)
    new_items: int = 0

    @property
    def positive_rate(self) -> float:
        return sum(self.actions.get(a, 0) for a in POSITIVE_ACTIONS) / max(self.events, 1)

    def __str__(self) -> str:
        last = self.start + timedelta(days=self.days - 1)
        pct = lambda n: f"{n:,} ({100 * n / max(self.events, 1):.1f}%)"  # noqa: E731
        return "\n".join([
            f"synthetic world -> {self.path}",
            f"  days      {self.days} ({self.start} .. {last})",
            f"  users     {self.users:,}",
            f"  items     {self.items:,} ({self.new_items:,} created during the window)",
            f"  events    {self.events:,}, positive rate {100 * self.positive_rate:.1f}%",
            "  actions   " + ", ".join(f"{a} {pct(n)}" for a, n in self.actions.items()),
            "  surfaces  " + ", ".join(f"{s} {pct(n)}" for s, n in self.surfaces.items()),
            f"  written in {self.seconds:.1f}s ({self.events / max(self.seconds, 1e-9):,.0f} events/s)",
        ])


@dataclass
class _Catalog:
    """Items so far, row i = item id i + 1. Grows by ``new_items_per_day`` every day."""

    topic: np.ndarray  # (n,) int64
    theta: np.ndarray  # (n,) float64, angle on the topic circle in [0, 2 pi)
    base_weight: np.ndarray  # (n,) float64, Zipf weight inside the topic
    created_us: np.ndarray  # (n,) int64, microseconds since the epoch
    features: np.ndarray  # (n, D) float32

    def __len__(self) -> int:
        return len(self.topic)

    def extend(self, other: _Catalog) -> None:
        for f in ("topic", "theta", "base_weight", "created_us", "features"):
            setattr(self, f, np.concatenate([getattr(self, f), getattr(other, f)]))


@dataclass
class _World:
    config: WorldConfig
    topic_prior: np.ndarray  # (T,) probabilities; some topics are bigger than others
    words: list[list[str]]  # (T, WORDS_PER_TOPIC)
    queries: np.ndarray  # (T * WORDS_PER_TOPIC,) object: search strings, WORDS_PER_TOPIC per topic
    centroids: np.ndarray  # (T, D)
    axes: np.ndarray  # (T, 2, D): the plane of the topic circle in feature space
    catalog: _Catalog
    interests: np.ndarray  # (U, k) int64 distinct topics per user
    interest_cdf: np.ndarray  # (U, k) cumulative interest weights
    activity_cdf: np.ndarray  # (U,) cumulative session share of users
    actions: np.ndarray = field(default_factory=lambda: np.zeros(len(ACTIONS), np.int64))
    surfaces: np.ndarray = field(default_factory=lambda: np.zeros(len(SURFACES), np.int64))


def _day_start_us(d: date) -> int:
    return (d - date(1970, 1, 1)).days * US_PER_DAY


def _words(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct made-up words from 2 or 3 syllables, in a seeded order."""
    s = SYLLABLES
    combos = [a + b for a in s for b in s if a != b] + [a + b + c for a in s for b in s for c in s if a != b != c]
    order = rng.permutation(len(combos))
    return [combos[order[i % len(combos)]] + (str(i // len(combos)) if i >= len(combos) else "") for i in range(n)]


def _new_items(w_cfg: WorldConfig, n: int, start_us: int, span_us: int, topic_prior: np.ndarray,
               centroids: np.ndarray, axes: np.ndarray, topic_sizes: np.ndarray,
               rng: np.random.Generator, cover: bool = False) -> _Catalog:
    """``n`` items created uniformly in ``[start_us, start_us + span_us)``.

    ``cover`` gives every topic two items first (so every topic has a neighbour structure); a new item's Zipf
    rank is drawn uniformly among its topic's current size, so new items are as skewed as old ones.
    """
    T, D = centroids.shape
    topic = rng.choice(T, size=n, p=topic_prior)
    if cover:
        topic[: 2 * T] = np.tile(np.arange(T), 2)
    theta = rng.uniform(0.0, 2 * np.pi, n)
    if cover:  # initial catalog: ranks are a random permutation inside each topic
        keys = rng.random(n)
        order = np.lexsort((keys, topic))
        sizes = np.bincount(topic, minlength=T)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, sizes)
        rank += 1
    else:
        rank = 1 + np.floor(rng.random(n) * (topic_sizes[topic] + 1)).astype(np.int64)
    base = rank.astype(np.float64) ** -w_cfg.popularity_exponent
    created = start_us + (rng.random(n) * span_us).astype(np.int64)
    circle = np.cos(theta)[:, None] * axes[topic, 0] + np.sin(theta)[:, None] * axes[topic, 1]
    feats = centroids[topic] + 0.5 * circle + 0.1 * rng.standard_normal((n, D))
    return _Catalog(topic, theta, base, created, feats.astype(np.float32))


def _build_world(cfg: WorldConfig) -> tuple[_World, pd.DataFrame]:
    """The day-0 state of the world and the users table."""
    rng = np.random.default_rng([cfg.seed, 0])
    T, U, k, D = cfg.n_topics, cfg.n_users, cfg.interests_per_user, cfg.feature_dim
    # Topic sizes and audience shares vary mildly (Zipf 0.5 over a random order).
    prior = rng.permutation(np.arange(1, T + 1, dtype=np.float64) ** -0.5)
    prior /= prior.sum()
    words = _words(T * WORDS_PER_TOPIC, rng)
    words_t = [words[t * WORDS_PER_TOPIC:(t + 1) * WORDS_PER_TOPIC] for t in range(T)]
    # Queries: each word alone and with its circular neighbour ("kalo", "kalo mira").
    queries = np.array([w if j % 2 == 0 else f"{w} {ws[(j + 1) % WORDS_PER_TOPIC]}"
                        for ws in words_t for j, w in enumerate(ws)], dtype=object)
    centroids = rng.standard_normal((T, max(D, 1)))[:, :D]
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
    axes = rng.standard_normal((T, 2, D)) / np.sqrt(max(D, 1))

    start_us = _day_start_us(cfg.start)
    catalog = _new_items(cfg, cfg.n_items, start_us - ITEM_HISTORY_DAYS * US_PER_DAY, ITEM_HISTORY_DAYS * US_PER_DAY,
                         prior, centroids, axes, np.zeros(T, np.int64), rng, cover=True)

    # Interests: k distinct topics drawn by the prior without replacement (Gumbel top-k).
    keys = np.log(prior) + rng.gumbel(size=(U, T))
    interests = np.argsort(-keys, axis=1)[:, :k]
    weights = np.sort(rng.dirichlet(np.ones(k), size=U), axis=1)[:, ::-1]
    activity = rng.lognormal(0.0, 1.0, U)

    # Demographics lean on the strongest interest: a preferred age bucket and gender per topic.
    first = interests[:, 0]
    age_p = 0.6 / len(AGE_BUCKETS) + 0.4 * np.eye(len(AGE_BUCKETS))[first % len(AGE_BUCKETS)]
    age = (rng.random((U, 1)) > np.cumsum(age_p, axis=1)).sum(axis=1)
    p_f = np.where(first % 2 == 0, 0.63, 0.33)
    g = rng.random(U)
    gender = np.where(g < p_f, 0, np.where(g < 0.96, 1, 2))
    country = rng.choice(len(COUNTRIES), size=U, p=COUNTRY_PROBS)
    signup = start_us - (rng.random(U) * SIGNUP_HISTORY_DAYS * US_PER_DAY).astype(np.int64)
    users = pd.DataFrame({
        "user_id": np.arange(1, U + 1, dtype=np.int64),
        "signup_ts": pd.to_datetime(signup, unit="us", utc=True),
        "country": np.array(COUNTRIES, dtype=object)[country],
        "age_bucket": np.array(AGE_BUCKETS, dtype=object)[age],
        "gender": np.array(GENDERS, dtype=object)[gender],
    })
    world = _World(cfg, prior, words_t, queries, centroids, axes, catalog, interests,
                   np.cumsum(weights, axis=1), np.cumsum(activity / activity.sum()))
    return world, users


def planted_interests(config: WorldConfig) -> np.ndarray:
    """The users' interest topics on the first day, the ground truth that analyses measure against.

    Returns ``(n_users, interests_per_user)`` int64 topic indices (topic t is category ``topic_{t:02d}``); row i
    is user id i + 1. Later days differ by drift.
    """
    return _build_world(config)[0].interests.copy()


def _drift(w: _World, rng: np.random.Generator) -> None:
    """Each user swaps one interest slot for a topic they do not have, with probability ``drift_per_day``."""
    movers = np.nonzero(rng.random(len(w.interests)) < w.config.drift_per_day)[0]
    if len(movers) == 0:
        return
    keys = np.log(w.topic_prior) + rng.gumbel(size=(len(movers), len(w.topic_prior)))
    np.put_along_axis(keys, w.interests[movers], -np.inf, axis=1)
    slot = rng.integers(0, w.interests.shape[1], len(movers))
    w.interests[movers, slot] = np.argmax(keys, axis=1)


class _TopicSampler:
    """Draws items of given topics proportionally to their weights (one searchsorted for a whole batch)."""

    def __init__(self, topic: np.ndarray, weight: np.ndarray, n_topics: int):
        self.order = np.argsort(topic, kind="stable")
        self.cum = np.cumsum(weight[self.order])
        sizes = np.bincount(topic, minlength=n_topics)
        self.end = np.cumsum(sizes)  # exclusive end of each topic's segment in ``order``
        self.lo = np.concatenate([[0.0], self.cum[self.end[:-1] - 1]])
        self.total = self.cum[self.end - 1] - self.lo

    def sample(self, topics: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.cum, self.lo[topics] + u * self.total[topics], side="right")
        return self.order[np.minimum(pos, self.end[topics] - 1)]


class _Circle:
    """Items of each topic in angle order, to find the neighbours of a viewed item."""

    def __init__(self, topic: np.ndarray, theta: np.ndarray, n_topics: int):
        self.order = np.lexsort((theta, topic))
        self.rank = np.empty_like(self.order)
        self.rank[self.order] = np.arange(len(self.order))
        self.size = np.bincount(topic, minlength=n_topics)
        self.start = np.cumsum(self.size) - self.size
        self.topic = topic

    def neighbour(self, items: np.ndarray, offset: np.ndarray) -> np.ndarray:
        t = self.topic[items]
        return self.order[self.start[t] + (self.rank[items] - self.start[t] + offset) % self.size[t]]


def _session_lengths(n_events: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Geometric session lengths (capped) that add up to exactly ``n_events``."""
    parts, total = [], 0
    while total < n_events:
        chunk = np.minimum(rng.geometric(1.0 / mean, size=int(n_events / mean) + 16), MAX_SESSION_LEN)
        parts.append(chunk)
        total += int(chunk.sum())
    lengths = np.concatenate(parts)
    cum = np.cumsum(lengths)
    n = int(np.searchsorted(cum, n_events)) + 1
    lengths = lengths[:n].copy()
    lengths[-1] -= int(cum[n - 1]) - n_events
    return lengths


def _strings(codes: np.ndarray, names: tuple[str, ...]) -> pd.Series:
    """``names[codes]`` as a pandas string column, built in Arrow (several times faster than via objects)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names)).cast(pa.string()).to_pandas()


def _simulate_day(w: _World, day: date, rng: np.random.Generator) -> pd.DataFrame:
    """One day of events, sorted by time, in contract columns."""
    cfg, cat = w.config, w.catalog
    T = cfg.n_topics
    day_us = _day_start_us(day)
    topic_of = cat.topic

    age_days = np.maximum(day_us - cat.created_us, 0) / US_PER_DAY
    weight = cat.base_weight * (1.0 + FRESH_BOOST * np.exp(-age_days / FRESH_DAYS))
    everything = _TopicSampler(topic_of, weight, T)
    # Items created today may only be drawn after they exist; such draws fall back to older items.
    older = _TopicSampler(topic_of, np.where(cat.created_us < day_us, weight, 0.0), T)
    circle = _Circle(topic_of, cat.theta, T)
    prior_cdf = np.cumsum(w.topic_prior)

    lengths = np.sort(_session_lengths(cfg.events_per_day, 8.0, rng))[::-1]  # active sessions are a prefix
    S = len(lengths)
    user = np.searchsorted(w.activity_cdf, rng.random(S) * w.activity_cdf[-1], side="right")
    user = np.minimum(user, cfg.n_users - 1)
    gap_lo, gap_mean, gap_hi = SESSION_GAP_S
    latest_start = US_PER_DAY - int(MAX_SESSION_LEN * gap_hi * US_PER_S) - 1
    clock = day_us + (rng.random(S) * latest_start).astype(np.int64)

    def interest_topic(users: np.ndarray) -> np.ndarray:
        cdf = w.interest_cdf[users]
        slot = np.minimum((rng.random((len(users), 1)) * cdf[:, -1:] > cdf).sum(axis=1), cdf.shape[1] - 1)
        return w.interests[users, slot]

    def prior_topic(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(prior_cdf, rng.random(n) * prior_cdf[-1], side="right"), T - 1)

    # Session state; -1 = none.
    surface = np.full(S, -1, np.int64)
    context = np.full(S, -1, np.int64)
    query = np.full(S, -1, np.int64)  # index into w.queries
    prev_item = np.full(S, -1, np.int64)
    prev_positive = np.zeros(S, bool)
    slates = cfg.slate_size > 1
    session_topic = np.full(S, -1, np.int64)  # slates only: the interest this session is about (short-term intent)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "action", "ts", "surface", "ctx", "q", "req")}
    n_requests = 0

    def show(n: int, u: np.ndarray, ctx: np.ndarray, q: np.ndarray, ts: np.ndarray, sl: slice,
             is_search: np.ndarray, is_rel: np.ndarray, other_source: bool) -> tuple[np.ndarray, np.ndarray]:
        """One shown item per active session (the first ``n``, state ``u`` ... ``is_rel`` of this step) and what the
        user did with it -> (item, action).

        ``other_source``: the slate's other slots, as from generators that ignore the session's intent (half
        the user's long-term interests, half the global prior), so a slate mixes items that fit the session
        (engaged far more often) with items that do not: what a ranker that reads the session can tell apart.
        """
        # Topic, then item, per surface.
        if other_source:
            topic = np.where(rng.random(n) < SLATE_INTEREST, interest_topic(u), prior_topic(n))
            rr = np.ones(n)  # no related neighbour or same-topic draw
        else:
            topic = np.where(rng.random(n) < EXPLORE, prior_topic(n),
                             session_topic[sl] if slates else interest_topic(u))
            topic[is_search] = np.where(rng.random(int(is_search.sum())) < 0.9,
                                        q[is_search] // WORDS_PER_TOPIC, topic[is_search])
            rr = rng.random(n)
        same_topic = is_rel & (rr >= RELATED_NEIGHBOUR) & (rr < RELATED_NEIGHBOUR + RELATED_SAME_TOPIC)
        topic[same_topic] = topic_of[ctx[same_topic]]
        item = everything.sample(topic, rng.random(n))
        near = is_rel & (rr < RELATED_NEIGHBOUR)
        if near.any():
            m = int(near.sum())
            offset = rng.geometric(NEIGHBOUR_P, m) * np.where(rng.random(m) < 0.5, -1, 1)
            item[near] = circle.neighbour(ctx[near], offset)
        for _ in range(4):  # not yet created, or the viewed item itself: redraw an older item of the same topic
            bad = (cat.created_us[item] > ts) | (is_rel & (item == ctx))
            if not bad.any():
                break
            item[bad] = older.sample(topic_of[item[bad]], rng.random(int(bad.sum())))

        # Action: engaging when the item fits the user's interests or the session's intent.
        it = topic_of[item]
        interest = (w.interests[u] == it[:, None]).any(axis=1)
        intent = is_rel & (it == topic_of[np.maximum(ctx, 0)])
        intent |= is_search & (it == q // WORDS_PER_TOPIC)
        ra = rng.random(n)
        draw = lambda p: np.searchsorted(np.cumsum(p), ra * p.sum(), "right")  # noqa: E731
        if slates:  # the session's intent engages most; the user's other interests less (a realtime signal)
            intent |= ~is_rel & ~is_search & (it == session_topic[sl])
            action = np.where(intent, draw(AFFINE_ACTIONS), np.where(interest, draw(MID_ACTIONS),
                                                                     draw(OTHER_ACTIONS)))
        else:
            action = np.where(interest | intent, draw(AFFINE_ACTIONS), draw(OTHER_ACTIONS))
        return item, np.minimum(action, len(ACTIONS) - 1)

    for j in range(int(lengths[0]) if S else 0):
        n = int(np.searchsorted(-lengths, -j, side="left"))  # sessions longer than j
        sl = slice(0, n)
        u, r = user[sl], rng.random(n)
        surf, ctx, q = surface[sl], context[sl], query[sl]

        if j == 0:
            surf[:] = np.where(r < ENTRY_PROBS["homefeed"], _HOME,
                               np.where(r < ENTRY_PROBS["homefeed"] + ENTRY_PROBS["search"], _SEARCH, _RELATED))
            entry = surf == _RELATED  # arrived from outside on an item of any topic
            ctx[entry] = older.sample(prior_topic(int(entry.sum())), rng.random(int(entry.sum())))
            if slates:
                topic0 = np.where(rng.random(n) < SESSION_EXPLORE, prior_topic(n), interest_topic(u))
                session_topic[sl] = np.where(entry, topic_of[np.maximum(ctx, 0)], topic0)
        else:
            pos, was = prev_positive[sl], surf.copy()
            open_rel = pos & (r < OPEN_RELATED)
            surf[open_rel], ctx[open_rel] = _RELATED, prev_item[sl][open_rel]
            neg = ~pos
            back = neg & (((was == _RELATED) & (r >= STAY_RELATED)) | ((was == _SEARCH) & (r >= STAY_SEARCH)))
            surf[back] = _HOME
            to_search = neg & (was == _HOME) & (r < HOMEFEED_TO_SEARCH)
            surf[to_search] = _SEARCH
            q[to_search] = -1
            ctx[surf != _RELATED] = -1
        new_query = (surf == _SEARCH) & (q < 0)
        if new_query.any():
            m = int(new_query.sum())
            qt = np.where(rng.random(m) < 0.8, interest_topic(u[new_query]), prior_topic(m))
            q[new_query] = qt * WORDS_PER_TOPIC + rng.integers(0, WORDS_PER_TOPIC, m)
        q[surf != _SEARCH] = -1

        is_search, is_rel = surf == _SEARCH, surf == _RELATED
        ts = clock[sl]

        # Each step is one request; with slate_size > 1 it shows that many items at the same time (a slate).
        # The session goes on from the first engaged slot (the item the user opened), else from the first slot.
        request = n_requests + np.arange(n)
        n_requests += n
        slots = [show(n, u, ctx, q, ts, sl, is_search, is_rel, other_source=k > 0) for k in range(cfg.slate_size)]
        item, action = slots[0]
        nxt_item, nxt_pos = item.copy(), np.isin(action, _POSITIVE_CODES)
        for it_k, ac_k in slots[1:][::-1]:  # reversed: the first engaged slot is written last and wins
            pos_k = np.isin(ac_k, _POSITIVE_CODES)
            take = pos_k & ~np.isin(action, _POSITIVE_CODES)
            nxt_item[take], nxt_pos[take] = it_k[take], True
        for it_k, ac_k in slots:
            for key, val in (("user", u), ("item", it_k), ("action", ac_k), ("ts", ts.copy()), ("surface", surf.copy()),
                             ("ctx", np.where(is_rel, ctx, -1)), ("q", q.copy()), ("req", request)):
                out[key].append(val)
        prev_item[sl], prev_positive[sl] = nxt_item, nxt_pos
        if slates:  # the session follows what the user just engaged with
            session_topic[sl] = np.where(nxt_pos, topic_of[nxt_item], session_topic[sl])
        gaps = np.clip(rng.exponential(gap_mean, n), gap_lo, gap_hi)
        clock[sl] += (gaps * US_PER_S).astype(np.int64)

    cols = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}
    order = np.argsort(cols["ts"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    w.actions += np.bincount(cols["action"], minlength=len(ACTIONS))
    w.surfaces += np.bincount(cols["surface"], minlength=len(SURFACES))
    n_ev = len(order)
    ctx = cols["ctx"]
    df = pd.DataFrame({
        "event_id": pc.binary_join_element_wise(f"{day.isoformat()}-", pa.array(np.arange(n_ev)).cast(pa.string()),
                                                "").to_pandas(),
        "user_id": cols["user"] + 1,
        "item_id": cols["item"] + 1,
        "action": _strings(cols["action"], ACTIONS),
        "ts": pd.to_datetime(cols["ts"], unit="us", utc=True),
        "surface": _strings(cols["surface"], SURFACES),
        "context_item_id": pd.arrays.IntegerArray(np.where(ctx >= 0, ctx + 1, 0), ctx < 0),
        "query": np.where(cols["q"] >= 0, w.queries[np.maximum(cols["q"], 0)], None),
    })
    if cfg.slate_size > 1:  # only then: a world of single-item requests stays byte-identical to earlier versions
        df["request_id"] = pc.binary_join_element_wise(
            f"{day.isoformat()}-r", pa.array(cols["req"]).cast(pa.string()), "").to_pandas()
    return df


def _items_table(w: _World) -> pd.DataFrame:
    """The catalog in contract columns; ``genres`` is the item's arc on the topic circle, plus the next arc
    when the item sits near its edge."""
    cat, G = w.catalog, WORDS_PER_TOPIC
    n, T = len(cat), w.config.n_topics
    words = np.array([x for ws in w.words for x in ws], dtype=object)
    arc = cat.theta / (2 * np.pi) * G
    sub = np.minimum(arc.astype(np.int64), G - 1)
    frac = arc - sub
    other = np.where(frac < 0.5, sub - 1, sub + 1) % G
    two = np.minimum(frac, 1 - frac) < 0.15
    first, second = words[cat.topic * G + sub], words[cat.topic * G + other]
    genres = np.where(two, first + "|" + second, first)
    ids = np.arange(1, n + 1)
    titles = (np.char.capitalize(first.astype(str)).astype(object) + " "
              + words[cat.topic * G + (sub + 1 + ids % (G - 1)) % G] + " no. " + ids.astype(str).astype(object))
    width = max(2, len(str(T - 1)))
    names = np.array([f"topic_{t:0{width}d}" for t in range(T)], dtype=object)
    df = pd.DataFrame({
        "item_id": ids.astype(np.int64),
        "category": names[cat.topic],
        "genres": genres,
        "title": titles,
        "created_ts": pd.to_datetime(cat.created_us, unit="us", utc=True),
    })
    if cat.features.shape[1]:
        df["features"] = list(cat.features)
    return df


def _check(cfg: WorldConfig) -> None:
    if cfg.n_items < 2 * cfg.n_topics:
        raise TowerflowError(f"world config: n_items ({cfg.n_items}) must be at least 2 x n_topics "
                             f"({cfg.n_topics}) so every topic has neighbours")
    if cfg.interests_per_user >= cfg.n_topics:
        raise TowerflowError(f"world config: interests_per_user ({cfg.interests_per_user}) must be below "
                             f"n_topics ({cfg.n_topics}) so interests can drift")


def _prepare(sink: ParquetSink, out_uri: str, cfg: WorldConfig) -> None:
    """Replace a world generated here before; refuse to mix into a source that holds other events."""
    events, marker = f"{sink.root}/events", f"{sink.root}/world.json"
    if sink.fs.exists(events):
        if not sink.fs.exists(marker):
            raise TowerflowError(f"{out_uri}: already holds events that are not a generated world; "
                                 "choose an empty --out")
        sink.fs.rm(events, recursive=True)
    with sink.fs.open(marker, "w") as f:
        json.dump({"generator": "towerflow.data.synthetic", "config": cfg.model_dump(mode="json")}, f, indent=2)


def generate_world(out_uri: str, config: WorldConfig | None = None) -> WorldSummary:
    """Write a synthetic world to ``out_uri`` (local path or fsspec URL) in the contract's Parquet layout.

    Days ``config.start .. start + days - 1`` each get ``events_per_day`` events in ``events/dt=DAY/``;
    ``users.parquet`` and ``items.parquet`` (every item created up to the last day) follow, with a
    ``world.json`` recording the config and ``source.json`` recording explicit feedback. Holds one day of events in memory at a time. The same config gives
    byte-identical files.
    """
    cfg = config or WorldConfig()
    _check(cfg)
    t0 = time.perf_counter()
    sink = ParquetSink(out_uri)
    _prepare(sink, out_uri, cfg)
    world, users = _build_world(cfg)
    sink.write_users(users)
    say(f"generating {cfg.days} day(s) x {cfg.events_per_day:,} events -> {out_uri}")
    n_events = 0
    for d in progress(range(cfg.days), total=cfg.days, desc="days", every=0.0 if cfg.days <= 60 else 2.0):
        day = cfg.start + timedelta(days=d)
        rng = np.random.default_rng([cfg.seed, 1, d])
        if d > 0:
            _drift(world, rng)
        if cfg.new_items_per_day:
            sizes = np.bincount(world.catalog.topic, minlength=cfg.n_topics)
            world.catalog.extend(_new_items(cfg, cfg.new_items_per_day, _day_start_us(day), US_PER_DAY,
                                            world.topic_prior, world.centroids, world.axes, sizes, rng))
        n_events += sink.write_events_day(day, _simulate_day(world, day, rng))
    sink.write_items(_items_table(world))
    sink.write_record("explicit")  # impressions, skips and hides are logged: the positive-rate checks apply
    return WorldSummary(
        path=sink.uri, users=cfg.n_users, items=len(world.catalog), days=cfg.days, events=n_events,
        actions={a: int(c) for a, c in zip(ACTIONS, world.actions, strict=True)},
        surfaces={s: int(c) for s, c in zip(SURFACES, world.surfaces, strict=True)},
        seconds=time.perf_counter() - t0, start=cfg.start, new_items=cfg.days * cfg.new_items_per_day,
    )
