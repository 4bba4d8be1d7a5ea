"""Benchmark: how wall time and peak memory grow with data, from 10^4 to 10^6 events, for the front of the
pipeline: generate -> extract -> build_examples -> train one epoch.

    python -m bench.scaling [--events 10000 30000 100000 300000 1000000] [--threads N]

Each size is a synthetic world of 7 days whose users and items grow with it (one user per 50 events, one item per
100, at least 200 of each), run in a fresh process so its peak RSS is its own; RSS is read after each stage, so
the table shows which stage sets the peak. ``train`` is one epoch with the default TrainConfig plus its epoch-end
evaluation on the holdout (at most 5,000 users). The growth exponent is the slope of log(time) against
log(events) between the smallest and the largest size (1 = linear). Prints a table, writes
``bench/results/scaling.json`` and plots ``bench/results/scaling.png``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import RESULTS_DIR, command_line, peak_rss_mib, print_table, run_in_child, write_result

STAGES = ("generate", "extract", "build_examples", "train")
DAYS = 7


def world_for(events: int):
    from towerflow.config import WorldConfig

    items = max(200, events // 100)
    return WorldConfig(n_users=max(200, events // 50), n_items=items, days=DAYS, events_per_day=events // DAYS,
                       new_items_per_day=max(1, items // 100))


def _run(events: int, threads: int | None) -> dict:
    import torch

    from towerflow.config import ExamplesConfig, TrainConfig
    from towerflow.data.source import ParquetSource
    from towerflow.data.synthetic import generate_world
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.extract import extract
    from towerflow.tasks.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = world_for(events)
    out: dict = {"events": events, "world": cfg.model_dump(mode="json"), "torch_threads": torch.get_num_threads(),
                 "rss_start_mib": round(peak_rss_mib(), 1)}
    with tempfile.TemporaryDirectory(prefix="towerflow-scaling-") as tmp:
        def timed(stage: str, fn):
            t0 = time.perf_counter()
            value = fn()
            out[f"{stage}_s"] = round(time.perf_counter() - t0, 3)
            out[f"{stage}_rss_mib"] = round(peak_rss_mib(), 1)
            print(f"  {events:,} events: {stage} {out[f'{stage}_s']:.1f}s", flush=True)
            return value

        summary = timed("generate", lambda: generate_world(f"{tmp}/source", cfg))
        as_of = datetime.combine(cfg.start, datetime.min.time(), tzinfo=UTC) + timedelta(days=DAYS)
        snapshot = timed("extract", lambda: extract(ParquetSource(f"{tmp}/source"), as_of, DAYS, Path(tmp) / "snap"))
        examples = timed("build_examples", lambda: build_examples(
            snapshot.events(), snapshot.users(), snapshot.items(), as_of, ExamplesConfig()))
        train_config = TrainConfig(epochs=1)
        result = timed("train", lambda: train(examples, train_config))
    out |= {"train_config": train_config.model_dump(mode="json"),"events_written": summary.events, "train_examples": len(examples.train),
            "holdout_examples": len(examples.holdout), "train_examples_per_s": round(result.examples_per_s),
            "total_s": round(sum(out[f"{s}_s"] for s in STAGES), 3), "peak_rss_mib": round(peak_rss_mib(), 1)}
    return out


def growth_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log(y) against log(x) between the first and the last point."""
    if len(xs) < 2 or min(ys[0], ys[-1]) <= 0:
        return None
    return round(math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0]), 2)


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["events"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        left.plot(x, [r[f"{stage}_s"] for r in runs], marker="o", label=stage)
    left.plot(x, [r["total_s"] for r in runs], marker="s", color="black", label="total")
    left.set(xscale="log", yscale="log", xlabel="events", ylabel="wall time (s)", title="wall time per stage")
    right.plot(x, [r["peak_rss_mib"] for r in runs], marker="o", color="tab:red", label="peak")
    right.plot(x, [r["rss_start_mib"] for r in runs], ls="--", color="grey", label="after imports")
    right.legend(fontsize=8)
    right.set(xscale="log", yscale="log", xlabel="events", ylabel="peak RSS (MiB)", title="peak memory")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = [("events", "events", ","), ("users", "users", ","), ("items", "items", ","),
           ("train ex", "train_examples", ","), ("generate s", "generate_s", ".1f"), ("extract s", "extract_s", ".1f"),
           ("examples s", "build_examples_s", ".1f"), ("train s", "train_s", ".1f"), ("total s", "total_s", ".1f"),
           ("train ex/s", "train_examples_per_s", ","), ("peak RSS MiB", "peak_rss_mib", ",.0f")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, all cores)")
    args = p.parse_args(argv)

    runs = []
    for n in sorted(args.events):
        print(f"{n:,} events ...", flush=True)
        run = run_in_child(_run, events=n, threads=args.threads)
        run |= {"users": run["world"]["n_users"], "items": run["world"]["n_items"]}
        runs.append(run)
    x = [r["events"] for r in runs]
    exponents = {s: growth_exponent(x, [r[f"{s}_s"] for r in runs]) for s in (*STAGES, "total")}
    exponents["peak_rss"] = growth_exponent(x, [r["peak_rss_mib"] for r in runs])
    print_table(runs, COLUMNS, title="generate -> extract -> build_examples -> train 1 epoch")
    print("growth exponent (log time / log events, first to last size): "
          + ", ".join(f"{k} {v}" for k, v in exponents.items()))
    png = plot(runs, RESULTS_DIR / "scaling.png")
    print(f"plot: {png}")
    result = {"days": DAYS, "runs": runs, "growth_exponents": exponents, "plot": str(png)}
    write_result("scaling", result, command_line("bench.scaling", argv))
    return result


if __name__ == "__main__":
    main()
