"""Benchmark: what the search slice's ceiling is made of (issue 18), by scorers that need no training.

    python -m bench.search_ceiling [--seeds 0 1 2] [--users 10000] [--events-per-day 30000] [--days 7]
                                   [--result-name search_ceiling]

The worlds and holdout of bench/quality.py (same arguments and seeds give the same rows), its ``search`` rows only,
ranked with the evaluation's exclusions by:

- ``oracle``: bench/oracle.py, the Bayes-optimal scorer under the generator's own parameters;
- ``oracle, users unknown``: the same without the users' interests (a world day with no interest topics);
- ``oracle, static popularity``: the same with the items' Zipf weights alone, no fresh boost;
- ``topic x positives``: items of the query's topic by their positives on ``homefeed`` and ``search`` (where items
  are drawn by popularity) before the holdout day; other items after them;
- ``topic x age-adjusted positives``: the same counts divided by each item's fresh boost over the days they were
  counted and multiplied by its boost on the request day (``age_adjusted_popularity``; the age comes from the items'
  ``created_ts``, the boost curve is the generator's, i.e. what an item-age input would have to learn).

The last two know the query's topic from the world's query list (a model learns it from the words). Ties are broken
at random (seeded), not against the target: integer counts tie often. Recall@10 pooled over the seeds, overall and by
the target's age at the request. Prints a table and writes ``bench/results/<result-name>.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np

from bench.common import command_line, print_table, write_result

SCORERS = ("oracle", "oracle, users unknown", "oracle, static popularity", "topic x positives",
           "topic x age-adjusted positives")
AGES = {"all": (-np.inf, np.inf), "under 1 day old": (-np.inf, 1.0), "1-2 days": (1.0, 2.0), "2-7 days": (2.0, 7.0),
        "older": (7.0, np.inf)}  # the target's age at the request


def fresh_boost(age_days: np.ndarray) -> np.ndarray:
    """The generator's popularity multiplier of an item ``age_days`` old at a day's start (synthetic.py)."""
    from towerflow.data.synthetic import FRESH_BOOST, FRESH_DAYS

    return 1.0 + FRESH_BOOST * np.exp(-np.maximum(age_days, 0.0) / FRESH_DAYS)


def age_adjusted_popularity(item: np.ndarray, created_us: np.ndarray, topic: np.ndarray, first_day_us: int,
                            day_us: int) -> np.ndarray:
    """(n,) each catalog row's popularity on the day starting ``day_us``, from its positives in the days before.

    ``item``: catalog rows of the positives counted, all in ``[first_day_us, day_us)``. An item's count is divided by
    its exposure (its fresh boost at each counted day's start, times the share of that day it existed) and multiplied
    by its boost on the day; an item that did not exist yet takes the mean of its topic's items created in the window
    (new items' ranks are drawn as those were).
    """
    from towerflow.data.synthetic import US_PER_DAY

    counts = np.bincount(item, minlength=len(created_us)).astype(np.float64)
    exposure = np.zeros(len(created_us))
    for d_us in range(first_day_us, day_us, US_PER_DAY):
        share = np.clip((d_us + US_PER_DAY - created_us) / US_PER_DAY, 0.0, 1.0)
        exposure += share * fresh_boost((d_us - created_us) / US_PER_DAY)
    rate = np.divide(counts, exposure, out=np.zeros_like(counts), where=exposure > 0)
    window = (created_us >= first_day_us) & (exposure > 0)
    n_topics = int(topic.max(initial=0)) + 1
    total = np.bincount(topic[window], rate[window], n_topics)
    size = np.bincount(topic[window], minlength=n_topics)
    fallback = rate[window].mean() if window.any() else 0.0
    topic_mean = np.where(size > 0, total / np.maximum(size, 1), fallback)
    rate = np.where(exposure > 0, rate, topic_mean[topic])
    return rate * fresh_boost((day_us - created_us) / US_PER_DAY)


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """One world: each scorer's ranks on the search holdout rows and the targets' ages in days."""
    from bench import oracle
    from bench.quality import _examples
    from towerflow.config import WorldConfig
    from towerflow.contract import POSITIVE_ACTIONS
    from towerflow.data.source import ParquetSource
    from towerflow.data.synthetic import US_PER_DAY, generate_world
    from towerflow.tasks.evaluate import target_ranks

    world = WorldConfig(n_users=args.users, events_per_day=args.events_per_day, days=args.days, seed=seed)
    with tempfile.TemporaryDirectory(prefix="towerflow-ceiling-") as tmp:
        generate_world(tmp, world)
        src = ParquetSource(tmp)
        start = datetime(world.start.year, world.start.month, world.start.day, tzinfo=UTC)
        end = start + timedelta(days=world.days)
        ex, _ = _examples(src, src.read_users(), src.read_items(), start, end)
        events = src.read_events(start, end - timedelta(days=1))
    ho, vocab = ex.holdout, ex.vocab
    rows = np.flatnonzero(ho.surface == oracle.SEARCH)
    day = oracle.world_day(world, world.days - 1)
    ts_us = ho.ts[rows] * 1_000_000 + 999_999
    if ((ts_us - day.day_us) // US_PER_DAY != 0).any():
        raise SystemExit("search_ceiling: the holdout must be the world's last day")
    users = vocab.user_ids[ho.user_idx[rows] - 1] - 1
    topics = oracle.query_topics(world, ho.query[rows])
    catalog = vocab.item_ids - 1  # vocabulary index j + 1 -> catalog row
    counted = (events["surface"].isin(["homefeed", "search"]) & events["action"].isin(POSITIVE_ACTIONS)).to_numpy()
    first_us = day.day_us - (world.days - 1) * US_PER_DAY
    positives = events["item_id"].to_numpy()[counted] - 1
    popularity = {"topic x positives": np.bincount(positives, minlength=len(day.topic)).astype(np.float64),
                  "topic x age-adjusted positives": age_adjusted_popularity(positives, day.created_us, day.topic,
                                                                            first_us, day.day_us)}
    worlds = {"oracle": day, "oracle, users unknown": replace(day, interests=day.interests[:, :0],
                                                              interest_weights=day.interest_weights[:, :0]),
              "oracle, static popularity": replace(day, weight=day.weight / fresh_boost(
                  (day.day_us - day.created_us) / US_PER_DAY))}
    tiebreak = 1.0 + 1e-9 * np.random.default_rng(seed).random(len(day.topic))

    def scores(name: str, i: int) -> np.ndarray:
        if name in worlds:
            p = oracle.oracle_scores(worlds[name], int(users[i]), oracle.SEARCH, int(ts_us[i]), int(topics[i]))
        else:  # the query's topic first, items not created yet last (created_ts is known)
            w = popularity[name]
            p = np.where(day.topic == topics[i], 1.0 + w, 1e-6 * w) * (day.created_us <= ts_us[i])
        return p * tiebreak

    from towerflow.tasks.history import SeenItems

    seen = SeenItems.from_lists([ex.holdout_seen.row(r) for r in rows])
    ranks = {}
    for name in SCORERS:
        def score_rows(sel: np.ndarray, name: str = name) -> np.ndarray:
            return np.stack([np.concatenate([[0.0], scores(name, int(i))[catalog]]) for i in sel])
        ranks[name] = target_ranks(score_rows, ho.target_items[rows], vocab.n_items, seen, chunk_rows=256).tolist()
    target = catalog[ho.target_items[rows] - 1]
    age = (ho.ts[rows] * 1_000_000 - day.created_us[target]) / US_PER_DAY
    return {"seed": seed, "n_search": len(rows), "ranks": ranks, "target_age_days": age.round(4).tolist()}


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{scorer: {age bucket: {"recall@10", "n", "stderr"}}} pooled over the runs."""
    from bench.quality import _stderr

    age = np.concatenate([r["target_age_days"] for r in runs])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in SCORERS:
        hit = np.concatenate([r["ranks"][name] for r in runs]) <= 10
        out[name] = {}
        for bucket, (lo, hi) in AGES.items():
            m = (age > lo) & (age <= hi)
            r = float(hit[m].mean()) if m.any() else float("nan")
            out[name][bucket] = {"recall@10": r, "n": int(m.sum()), "stderr": _stderr(r, m.sum())}
    return out


def main(argv: list[str] | None = None) -> dict:
    from bench.quality import add_world_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_world_arguments(p)
    p.add_argument("--result-name", default="search_ceiling")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    runs = [run_seed(s, args) for s in args.seeds]
    pooled = summarize(runs)
    n = {b: pooled["oracle"][b]["n"] for b in AGES}
    print_table([{"scorer": k, **{b: v[b]["recall@10"] for b in AGES}} for k, v in pooled.items()],
                [("scorer", "scorer", "")] + [(f"{b} (n={n[b]})", b, ".4f") for b in AGES],
                title=f"search recall@10 by the target's age at the request, seeds {args.seeds} pooled")
    wall = time.perf_counter() - t0
    result = {"args": vars(args), "wall_seconds": round(wall, 1), "pooled": pooled,
              "runs": [{k: v for k, v in r.items() if k not in ("ranks", "target_age_days")} for r in runs]}
    write_result(args.result_name, result, command_line("bench.search_ceiling", argv))
    return result


if __name__ == "__main__":
    main()
