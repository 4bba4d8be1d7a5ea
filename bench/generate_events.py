"""Benchmark: how fast the synthetic world generator writes events, and how much memory it holds.

    python -m bench.generate_events [--events 1000000] [--days 10] [--streaming-check]

Each measured run happens in a fresh process, so its peak RSS (``resource.getrusage``) is its own. The
``--streaming-check`` run writes twice the days at the same events per day: with one day in memory at a time its
peak RSS stays about the same. Prints a table and writes ``bench/results/generate_events.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "generate_events.json"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _run(events: int, days: int, users: int, items: int, topics: int, new_items_per_day: int) -> dict:
    """Generate one world into a temporary directory and measure it (runs in a child process)."""
    from towerflow.config import WorldConfig
    from towerflow.data.synthetic import generate_world

    config = WorldConfig(n_users=users, n_items=items, n_topics=topics, days=days,
                         events_per_day=events // days, new_items_per_day=new_items_per_day)
    before = _rss_mib()
    with tempfile.TemporaryDirectory(prefix="towerflow-bench-") as tmp:
        summary = generate_world(tmp, config)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    return {
        "config": config.model_dump(mode="json"),
        "events": summary.events,
        "seconds": round(summary.seconds, 3),
        "events_per_s": round(summary.events / summary.seconds),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(_rss_mib(), 1),
        "bytes_on_disk": size,
        "positive_rate": round(summary.positive_rate, 4),
    }


def _in_child(**kwargs) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run, kwds=kwargs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=10)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--topics", type=int, default=50)
    p.add_argument("--new-items-per-day", type=int, default=200)
    p.add_argument("--streaming-check", action="store_true", help="also run 2x the days at the same day size")
    args = p.parse_args(argv)
    sizes = dict(users=args.users, items=args.items, topics=args.topics, new_items_per_day=args.new_items_per_day)

    runs = {"main": _in_child(events=args.events, days=args.days, **sizes)}
    if args.streaming_check:
        runs["double_days"] = _in_child(events=2 * args.events, days=2 * args.days, **sizes)

    print(f"\n{'run':<12} {'events':>10} {'days':>5} {'seconds':>8} {'events/s':>10} "
          f"{'RSS before':>11} {'peak RSS':>9} {'on disk':>9}")
    for name, r in runs.items():
        print(f"{name:<12} {r['events']:>10,} {r['config']['days']:>5} {r['seconds']:>8.2f} "
              f"{r['events_per_s']:>10,} {r['rss_before_mib']:>8.0f} MiB {r['peak_rss_mib']:>5.0f} MiB "
              f"{r['bytes_on_disk'] / 2**20:>5.1f} MiB")
    result = {
        "benchmark": "generate_events",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS}")
    return result


if __name__ == "__main__":
    main()
