"""Benchmark: how fast the synthetic world generator writes events, and how much memory it holds.

    python -m bench.generate_events [--events 1000000] [--days 10] [--streaming-check]

Each measured run happens in a fresh process, so its peak RSS (``resource.getrusage``) is its own. The
``--streaming-check`` run writes twice the days at the same events per day: with one day in memory at a time its
peak RSS stays about the same. Prints a table and writes ``bench/results/generate_events.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import command_line, peak_rss_mib, print_table, run_in_child, write_result


def _run(events: int, days: int, users: int, items: int, topics: int, new_items_per_day: int) -> dict:
    """Generate one world into a temporary directory and measure it (runs in a child process)."""
    from towerflow.config import WorldConfig
    from towerflow.data.synthetic import generate_world

    config = WorldConfig(n_users=users, n_items=items, n_topics=topics, days=days,
                         events_per_day=events // days, new_items_per_day=new_items_per_day)
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="towerflow-bench-") as tmp:
        summary = generate_world(tmp, config)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    return {
        "config": config.model_dump(mode="json"),
        "events": summary.events,
        "seconds": round(summary.seconds, 3),
        "events_per_s": round(summary.events / summary.seconds),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "bytes_on_disk": size,
        "positive_rate": round(summary.positive_rate, 4),
    }


COLUMNS = [("run", "run", ""), ("events", "events", ","), ("days", "days", ""), ("seconds", "seconds", ".2f"),
           ("events/s", "events_per_s", ","), ("RSS before MiB", "rss_before_mib", ".0f"),
           ("peak RSS MiB", "peak_rss_mib", ".0f"), ("on disk MiB", "disk_mib", ".1f")]


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

    runs = {"main": run_in_child(_run, events=args.events, days=args.days, **sizes)}
    if args.streaming_check:
        runs["double_days"] = run_in_child(_run, events=2 * args.events, days=2 * args.days, **sizes)

    rows = [{"run": name, "days": r["config"]["days"], "disk_mib": r["bytes_on_disk"] / 2**20, **r}
            for name, r in runs.items()]
    print_table(rows, COLUMNS)
    result = {"runs": runs}
    write_result("generate_events", result, command_line("bench.generate_events", argv))
    return result


if __name__ == "__main__":
    main()
