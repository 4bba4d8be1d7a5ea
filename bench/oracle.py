"""Bench-only: the Bayes-optimal scorer of the synthetic world, the ceiling no model can pass (issue 18).

It reads the generator's own parameters (towerflow/data/synthetic.py), which no model or user has: each user's
true interests and their weights on the day, every item's topic, Zipf weight, fresh boost and creation time, the
topic circle. For one request (user, surface, time, query topic, viewed item) it returns, per item, the
probability that the generator shows that item AND the user engages positively (click, save or conversion), i.e.
up to a constant the posterior of the holdout target. Ranking by it gives the highest expected recall@K of any
scorer that does not know the target (the evaluation removes seen items, which never changes that order).

What the generator does for one shown item (``_simulate_day.show``, one item per request, ``slate_size`` 1):

- a topic: ``homefeed`` draws from the global prior with ``EXPLORE``, else one of the user's interests by its
  weight; ``search`` takes the query's topic with 0.9, else the homefeed draw; ``related`` takes a neighbour of
  the viewed item on its topic circle (``RELATED_NEIGHBOUR``, offset +-Geometric(``NEIGHBOUR_P``)), else the viewed
  item's topic (``RELATED_SAME_TOPIC``), else the homefeed draw;
- an item of that topic by weight (Zipf x fresh boost at the day's start) over every item the catalog holds that
  day; an item created after the request time (or the viewed item itself on ``related``) is redrawn from the
  topic's items created before the day, up to 4 times;
- an action: ``AFFINE_ACTIONS`` when the item's topic is one of the user's interests or the session's intent (the
  query's topic, the viewed item's topic), else ``OTHER_ACTIONS``.

The holdout target is the user's first positive of the day; the draw of one request does not depend on earlier
ones given its state, so conditioning on "first" changes nothing here. Request times come in whole seconds
(``SequenceExamples.ts``): an item created in the same second as the request counts as created before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import numpy as np

from towerflow.config import WorldConfig
from towerflow.data.synthetic import (
    _POSITIVE_CODES,
    AFFINE_ACTIONS,
    EXPLORE,
    FRESH_BOOST,
    FRESH_DAYS,
    NEIGHBOUR_P,
    OTHER_ACTIONS,
    RELATED_NEIGHBOUR,
    RELATED_SAME_TOPIC,
    US_PER_DAY,
    WORDS_PER_TOPIC,
    _build_world,
    _Circle,
    _day_start_us,
    _drift,
    _new_items,
)
from towerflow.errors import TowerflowError

SEARCH_QUERY_TOPIC = 0.9  # synthetic.py: a search item is of the query's topic with this probability
REDRAWS = 4  # synthetic.py: an item not yet created (or the viewed one) is redrawn at most this often
MAX_OFFSET = 64  # neighbour offsets summed up to here: Geometric(0.45) leaves 0.55**64 < 1e-16 beyond
P_POS_AFFINE = float(AFFINE_ACTIONS[_POSITIVE_CODES].sum() / AFFINE_ACTIONS.sum())  # 0.40
P_POS_OTHER = float(OTHER_ACTIONS[_POSITIVE_CODES].sum() / OTHER_ACTIONS.sum())  # 0.07
HOMEFEED, RELATED, SEARCH = 0, 1, 2  # contract SURFACES order


@dataclass
class WorldDay:
    """The generator's state on one day. Catalog row i = item id i + 1; user row u = user id u + 1."""

    topic: np.ndarray  # (n,) int64 topic of each item
    theta: np.ndarray  # (n,) float64 angle on its topic circle
    weight: np.ndarray  # (n,) float64 draw weight that day (Zipf x fresh boost at the day's start)
    created_us: np.ndarray  # (n,) int64
    day_us: int  # the day's start, microseconds since the epoch
    topic_prior: np.ndarray  # (T,) global topic prior
    interests: np.ndarray  # (U, k) int64 each user's interest topics that day
    interest_weights: np.ndarray  # (U, k) float64, rows sum to 1

    @property
    def n_topics(self) -> int:
        return len(self.topic_prior)

    @cached_property
    def circle(self) -> _Circle:
        return _Circle(self.topic, self.theta, self.n_topics)


def world_day(config: WorldConfig, day: int) -> WorldDay:
    """Replays the generator's drift and catalog growth up to day index ``day`` (0-based) of ``config``'s world.

    Each day's generator draws its drift and new items before its events from the same seeded stream, so the replay
    gives exactly the interests and catalog the events of that day were generated with.
    """
    if config.slate_size != 1:
        raise TowerflowError("oracle: only worlds of one item per request (slate_size 1); a slate session's "
                             "topic is hidden state the oracle does not replay")
    if not 0 <= day < config.days:
        raise TowerflowError(f"oracle: day {day} is outside the world's {config.days} days")
    w, _ = _build_world(config)
    for d in range(day + 1):
        rng = np.random.default_rng([config.seed, 1, d])
        if d > 0:
            _drift(w, rng)
        if config.new_items_per_day:
            sizes = np.bincount(w.catalog.topic, minlength=config.n_topics)
            w.catalog.extend(_new_items(config, config.new_items_per_day, _day_start_us(config.start + timedelta(d)),
                                        US_PER_DAY, w.topic_prior, w.centroids, w.axes, sizes, rng))
    day_us = _day_start_us(config.start + timedelta(days=day))
    cat = w.catalog
    age_days = np.maximum(day_us - cat.created_us, 0) / US_PER_DAY
    cdf = w.interest_cdf
    weights = np.diff(cdf, axis=1, prepend=0.0) / cdf[:, -1:]
    return WorldDay(cat.topic.copy(), cat.theta.copy(), cat.base_weight * (1.0 + FRESH_BOOST * np.exp(-age_days / FRESH_DAYS)),
                    cat.created_us.copy(), day_us, w.topic_prior.copy(), w.interests.copy(), weights)


def oracle_scores(day: WorldDay, user: int, surface: int, ts_us: int, query_topic: int = -1,
                  context: int = -1) -> np.ndarray:
    """(n,) float64 P(the request shows item i and the user engages positively), catalog rows as in ``WorldDay``.

    ``user`` is a user row; ``query_topic`` the query's topic on ``search``; ``context`` the viewed item's row on
    ``related``. Items are ranked by this; the probabilities of a request sum to its positive rate, not to 1.
    """
    T, topic, w = day.n_topics, day.topic, day.weight
    home = EXPLORE * day.topic_prior + (1 - EXPLORE) * np.bincount(day.interests[user], day.interest_weights[user], T)
    intent = -1
    if surface == SEARCH:
        if not 0 <= query_topic < T:
            raise TowerflowError(f"oracle: a search request needs its query's topic in 0..{T - 1}; got {query_topic}")
        mix, intent = (1 - SEARCH_QUERY_TOPIC) * home, query_topic
        mix[query_topic] += SEARCH_QUERY_TOPIC
    elif surface == RELATED:
        if not 0 <= context < len(topic):
            raise TowerflowError(f"oracle: a related request needs its viewed item's row; got {context}")
        mix, intent = (1 - RELATED_NEIGHBOUR - RELATED_SAME_TOPIC) * home, int(topic[context])
        mix[intent] += RELATED_SAME_TOPIC
    else:
        mix = home
    p = mix[topic] * w / np.bincount(topic, w, T)[topic]  # a topic, then an item of it by weight
    if surface == RELATED:
        c = day.circle
        k = np.arange(1, MAX_OFFSET + 1)
        pk = RELATED_NEIGHBOUR * 0.5 * NEIGHBOUR_P * (1 - NEIGHBOUR_P) ** (k - 1)
        for offset in (k, -k):
            np.add.at(p, c.neighbour(np.full(len(k), context), offset), pk)
    # Not yet created at the request (or the viewed item): redrawn among the topic's items older than the day.
    bad = day.created_us > ts_us
    if surface == RELATED:
        bad[context] = True
    older = np.where(day.created_us < day.day_us, w, 0.0)
    share = older / np.maximum(np.bincount(topic, older, T), 1e-300)[topic]
    for _ in range(REDRAWS):
        moved = np.bincount(topic[bad], p[bad], T)
        p[bad] = 0.0
        p += moved[topic] * share
    affine = np.isin(topic, day.interests[user]) | (topic == intent)
    return p * np.where(affine, P_POS_AFFINE, P_POS_OTHER)


def query_topics(config: WorldConfig, query_hashes: np.ndarray) -> np.ndarray:
    """(n,) topic of each row's query (``SequenceExamples.query`` token hashes), -1 for no query.

    The world's queries are a fixed list of topic words (synthetic.py), so each row's hashes name one of them.
    """
    from towerflow.models.query import token_hashes

    w, _ = _build_world(config)
    known = {tuple(token_hashes(q)): i // WORDS_PER_TOPIC for i, q in enumerate(w.queries)}
    out = np.full(len(query_hashes), -1, dtype=np.int64)
    for r, row in enumerate(query_hashes):
        key = tuple(int(h) for h in row[row > 0])
        if key:
            if key not in known:
                raise TowerflowError(f"oracle: row {r}'s query is none of the world's queries")
            out[r] = known[key]
    return out


def oracle_ranks(examples, config: WorldConfig) -> np.ndarray:
    """(n,) ranks of ``examples.holdout``'s targets under ``oracle_scores``, with the evaluation's exclusions.

    ``examples`` must come from the world ``config`` generated (its vocabulary maps ids to catalog rows).
    """
    from towerflow.tasks.evaluate import target_ranks

    ho, vocab = examples.holdout, examples.vocab
    ts_us = ho.ts * 1_000_000 + 999_999  # whole seconds: the latest microsecond the request can have had
    days = (ts_us - _day_start_us(config.start)) // US_PER_DAY
    worlds = {int(d): world_day(config, int(d)) for d in np.unique(days)}
    users = vocab.user_ids[ho.user_idx - 1] - 1
    items = vocab.item_ids - 1  # vocabulary index j + 1 -> catalog row
    context = np.where(ho.context_items > 0, vocab.item_ids[np.maximum(ho.context_items, 1) - 1] - 1, -1)
    topics = query_topics(config, ho.query)

    def score_rows(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), len(items) + 1))
        for j, r in enumerate(rows):
            p = oracle_scores(worlds[int(days[r])], int(users[r]), int(ho.surface[r]), int(ts_us[r]),
                              int(topics[r]), int(context[r]))
            out[j, 1:] = p[items]
        return out

    return target_ranks(score_rows, ho.target_items, vocab.n_items, examples.holdout_seen, chunk_rows=256)
