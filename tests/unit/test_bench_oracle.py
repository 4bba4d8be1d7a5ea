"""bench/oracle.py: the synthetic world's Bayes-optimal scorer, checked against numbers worked out by hand."""

import numpy as np
import pandas as pd
import pytest

from bench.oracle import HOMEFEED, RELATED, SEARCH, WorldDay, oracle_scores, query_topics, world_day
from towerflow.config import WorldConfig
from towerflow.data.source import ParquetSource
from towerflow.data.synthetic import generate_world, planted_interests
from towerflow.errors import TowerflowError
from towerflow.models.query import encode_texts


def tiny_day() -> WorldDay:
    """Topic 0: rows 0, 1, 2 (weights 3, 1, 1; row 2 created at 2000, after the requests at 1500); topic 1: rows 3,
    4 (weights 2, 2). One user, interested in topic 1 only."""
    return WorldDay(
        topic=np.array([0, 0, 0, 1, 1]), theta=np.array([0.1, 0.2, 0.3, 0.1, 0.2]),
        weight=np.array([3.0, 1.0, 1.0, 2.0, 2.0]), created_us=np.array([0, 0, 2000, 0, 0]), day_us=1000,
        topic_prior=np.array([0.5, 0.5]), interests=np.array([[1]]), interest_weights=np.array([[1.0]]),
    )


def test_search_mixes_the_query_topic_with_the_homefeed_draw_and_redraws_items_not_yet_created():
    # homefeed topic draw: 0.25 x prior (0.5, 0.5) + 0.75 x interest (0, 1) = (0.125, 0.875);
    # search: 0.9 x query topic 0 + 0.1 x that = (0.9125, 0.0875).
    # topic 0 (weight 5): rows 0.5475, 0.1825, 0.1825; row 2 is not created yet: its 0.1825 goes to the older
    # rows 0, 1 by weight 3 : 1 -> 0.684375, 0.228125. Topic 1 (weight 4): 0.0875 x 2/4 = 0.04375 each.
    # Every item is affine (topic 0 = the query's, topic 1 = the interest): x 0.40 positive.
    p = oracle_scores(tiny_day(), user=0, surface=SEARCH, ts_us=1500, query_topic=0)
    np.testing.assert_allclose(p, [0.27375, 0.09125, 0.0, 0.0175, 0.0175])
    # once row 2 exists (request after 2000) it keeps its own share
    np.testing.assert_allclose(oracle_scores(tiny_day(), 0, SEARCH, 2500, query_topic=0),
                               0.4 * np.array([0.5475, 0.1825, 0.1825, 0.04375, 0.04375]))


def test_homefeed_engages_items_outside_the_interests_at_the_other_rate():
    # topic 0: 0.125 x (3, 1, 1)/5 = 0.075, 0.025, 0.025; row 2's 0.025 -> rows 0, 1 by 3 : 1 -> 0.09375, 0.03125;
    # topic 0 is not an interest: x 0.07. Topic 1: 0.875 x 2/4 = 0.4375 each, x 0.40.
    p = oracle_scores(tiny_day(), user=0, surface=HOMEFEED, ts_us=1500)
    np.testing.assert_allclose(p, [0.0065625, 0.0021875, 0.0, 0.175, 0.175])


def test_related_adds_the_circle_neighbours_and_never_shows_the_viewed_item_after_four_redraws():
    # viewed item row 0 (topic 0, the intent). Topic draw: 0.2 x homefeed (0.125, 0.875) + 0.1 x topic 0 =
    # (0.125, 0.175): rows 0.075, 0.025, 0.025 and 0.0875, 0.0875.
    # Neighbours (0.7): offset +-k, k ~ Geometric(0.45), on a circle of 3: k = 1 mod 3 has 0.45 / q, k = 2 mod 3
    # 0.45 x 0.55 / q, k = 0 mod 3 (the viewed item itself) 0.45 x 0.55^2 / q, q = 1 - 0.55^3; +k and -k swap rows
    # 1 and 2, so each gets 0.35 x (0.45 + 0.2475) / q and row 0 gets 0.7 x 0.136125 / q.
    q = 1 - 0.55**3
    row0 = 0.075 + 0.7 * 0.136125 / q
    row12 = 0.025 + 0.35 * 0.6975 / q
    # Bad: row 0 (the viewed item) and row 2 (not created). Each of 4 redraws sends the bad mass M to the older
    # rows 0, 1 by 3 : 1, and row 0's share is bad again: row 0 keeps (3/4)^4 M, row 1 gains the rest.
    m = row0 + row12
    want = 0.4 * np.array([0.75**4 * m, row12 + (1 - 0.75**4) * m, 0.0, 0.0875, 0.0875])
    p = oracle_scores(tiny_day(), user=0, surface=RELATED, ts_us=1500, context=0)
    np.testing.assert_allclose(p, want)
    assert p.sum() == pytest.approx(0.4)  # every item affine: the shown item's distribution sums to 1


def test_requests_without_their_state_are_refused():
    with pytest.raises(TowerflowError, match="query's topic"):
        oracle_scores(tiny_day(), 0, SEARCH, 1500)
    with pytest.raises(TowerflowError, match="viewed item"):
        oracle_scores(tiny_day(), 0, RELATED, 1500)
    with pytest.raises(TowerflowError, match="slate_size 1"):
        world_day(WorldConfig(slate_size=2), 0)


def test_the_replay_gives_the_generated_worlds_catalog_interests_and_queries(tmp_path):
    cfg = WorldConfig(n_users=50, n_items=60, n_topics=4, days=3, events_per_day=500, new_items_per_day=10)
    generate_world(str(tmp_path), cfg)
    src = ParquetSource(str(tmp_path))
    items = src.read_items()
    last = world_day(cfg, 2)
    created = pd.DatetimeIndex(items["created_ts"]).as_unit("us").asi8
    np.testing.assert_array_equal(last.created_us, created)  # 60 + 3 x 10 items, row i = item id i + 1
    np.testing.assert_array_equal(last.topic, items["category"].str[-2:].astype(int).to_numpy())
    np.testing.assert_array_equal(world_day(cfg, 0).interests, planted_interests(cfg))
    # a query's first word is one of its topic's sub-genres, which the items table names per category
    word_topic = {g: int(c[-2:]) for c, gs in zip(items["category"], items["genres"], strict=True)
                  for g in gs.split("|")}
    queries = src.read_day(cfg.start)["query"].dropna().unique()
    assert len(queries) >= 3
    want = [word_topic[q.split()[0]] for q in queries]
    np.testing.assert_array_equal(query_topics(cfg, encode_texts(list(queries) + [None])), want + [-1])


def test_the_3x_target_is_reachable_only_above_the_oracle_by_more_than_one_standard_error():
    from bench.quality import search_ceiling

    # 3 x 0.187 = 0.561; the oracle's 1 s.e. on 1,500 rows: sqrt(0.6 x 0.4 / 1500) = 0.012649
    c = search_ceiling({"recall@10": 0.6, "n": 1500.0}, 0.187)
    assert c["target_3x_no_query"] == pytest.approx(0.561)
    assert c["oracle_stderr"] == pytest.approx(0.012649, abs=1e-6)
    assert c["oracle_minus_target"] == pytest.approx(0.039) and c["target_reachable"]
    assert not search_ceiling({"recall@10": 0.57, "n": 1500.0}, 0.187)["target_reachable"]  # 0.009 < 1 s.e.


def test_age_adjusted_popularity_divides_counts_by_the_fresh_boost_they_were_counted_under():
    from bench.search_ceiling import age_adjusted_popularity

    day = 86_400 * 10**6
    created = np.array([-100 * day, day, 2 * day + 1000, day // 2, 2 * day + 1000])
    topic = np.array([0, 0, 0, 1, 2])
    positives = np.array([0] * 4 + [1] * 21)  # counted over days 0 and 1; the request day is day 2
    w = age_adjusted_popularity(positives, created, topic, first_day_us=0, day_us=2 * day)
    # row 0: old (boost 1), 4 over 2 days -> 2 a day, x 1.
    # row 1: created at day 1's start: exposure 21 (boost 1 + 20 on day 1), 21 / 21 = 1; on day 2 it is 1 day old:
    #   x (1 + 20 e^-0.5) = 13.130613.
    # row 2: created on day 2, never counted: its topic's mean over items created in the window (row 1: 1) x 21.
    # row 3: created mid day 0 (half of it at 21, then 1 + 20 e^-0.25 on day 1), no positives -> 0.
    # row 4: a topic with no window item: the mean over all window items (rows 1, 3: 0.5) x 21.
    np.testing.assert_allclose(w, [2.0, 13.130613, 21.0, 0.0, 10.5], rtol=1e-6)
