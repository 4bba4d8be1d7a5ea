"""``make demo``: generate the synthetic world, run the whole retrain flow, show a retrieval from the promoted release.

Everything runs on the embedded defaults: Prefect's ephemeral API, MLflow on ``<data_root>/mlflow.db``, FAISS and
releases under ``<data_root>``. Run it again and unchanged stages are reused from the first run.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta

from towerflow.config import Settings, TrainConfig, WorldConfig

DEMO_EPOCHS = 8  # the demo world early-stops around epoch 15 for +0.02 recall@10: not worth a minute and a half here


def sample_request(settings: Settings, as_of) -> tuple[int, int, str]:
    """A user who was browsing ``related`` on the last day, and the item they were looking at."""
    import pandas as pd

    from towerflow.data.source import ParquetSource

    end = pd.Timestamp(as_of, tz="UTC")
    events = ParquetSource(settings.source).read_events((end - pd.Timedelta(days=1)).to_pydatetime(),
                                                        end.to_pydatetime())
    related = events[(events.surface == "related") & events.context_item_id.notna()]
    row = related.iloc[len(related) // 2] if len(related) else events.iloc[-1]
    context = int(row.context_item_id) if len(related) else int(row.item_id)
    return int(row.user_id), context, "related"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m towerflow.demo", description=__doc__)
    parser.add_argument("--days", type=int, default=WorldConfig().days, help="days of synthetic events")
    parser.add_argument("--events-per-day", type=int, default=WorldConfig().events_per_day)
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                        help=f"train.epochs cap (default {DEMO_EPOCHS}, to stay quick; a plain retrain's cap is "
                             f"{TrainConfig().epochs}, with early stopping on the validation split)")
    args = parser.parse_args(argv)

    from towerflow.cli import main as cli

    settings = Settings()
    t0 = time.perf_counter()
    world = WorldConfig(days=args.days, events_per_day=args.events_per_day)
    as_of = world.start + timedelta(days=world.days)
    print(f"== 1/3 synthetic world -> {settings.source}", flush=True)
    code = cli(["data", "generate", "--days", str(world.days), "--events-per-day", str(world.events_per_day)])
    if code:
        return code

    print(f"\n== 2/3 retrain flow on [{world.start}, {as_of}) (Prefect ephemeral API, MLflow {settings.tracking_uri})",
          flush=True)
    retrain = ["retrain", "--as-of", as_of.isoformat(), "--lookback-days", str(world.days)]
    # no refit: it would train the two-tower a second time (about a minute more) for the validation day's items
    code = cli(retrain + ["--no-refit"] + (["--epochs", str(args.epochs)] if args.epochs else []))
    if code:
        return code

    user, item, surface = sample_request(settings, as_of)
    print(f"\n== 3/3 retrieval from the champion release: user {user} viewing item {item} on '{surface}'", flush=True)
    code = cli(["serve", "query", str(user), "--context-item", str(item), "--surface", surface, "-k", "10"])
    if code:
        return code

    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s. Look around:")
    print(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {settings.tracking_uri} --host 127.0.0.1")
    print("  Prefect UI:  .venv/bin/towerflow stack up   (then re-run the flow with PREFECT_API_URL set)")
    print("  releases:    .venv/bin/towerflow release list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
