"""``towerflow data``: generate the synthetic world, import public data, extract snapshots."""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime

from towerflow.commands.common import add_source_option


def _as_of(text: str) -> datetime:
    """A date (midnight UTC) or an ISO timestamp."""
    try:
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
    except ValueError:
        ts = datetime.fromisoformat(text)
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate, import and extract event data")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    g = dsub.add_parser("generate", help="write the synthetic world (the embedded default source)")
    g.add_argument("--out", help="source URI to write (default: <data_root>/source)")
    g.add_argument("--users", type=int, help="number of users")
    g.add_argument("--items", type=int, help="catalog size on the first day")
    g.add_argument("--topics", type=int, help="number of topics")
    g.add_argument("--days", type=int, help="number of days")
    g.add_argument("--events-per-day", type=int, help="events per day")
    g.add_argument("--start", type=date.fromisoformat, help="first day (YYYY-MM-DD)")
    g.add_argument("--seed", type=int, help="random seed (same seed, same world)")
    g.set_defaults(handler=_generate)

    imp = dsub.add_parser("import", help="convert public data to the event contract")
    isub = imp.add_subparsers(dest="import_kind", metavar="KIND", required=True)
    ml = isub.add_parser("movielens", help="MovieLens 100K (u.data), RecBole atomic (.inter) or 1M (::) layout")
    ml.add_argument("path", help="directory holding the MovieLens files")
    ml.add_argument("--out", help="source URI to write (default: <data_root>/source)")
    ml.add_argument("--force", action="store_true", help="replace what is already at the output")
    ml.set_defaults(handler=_import_movielens)
    it = isub.add_parser("interactions", help="generic user,item[,timestamp][,rating|action] CSV or Parquet")
    it.add_argument("file", help="CSV or Parquet file")
    it.add_argument("--out", help="source URI to write (default: <data_root>/source)")
    it.add_argument("--force", action="store_true", help="replace what is already at the output")
    it.set_defaults(handler=_import_interactions)

    x = dsub.add_parser("extract", help="snapshot the window [as_of - lookback_days, as_of)")
    x.add_argument("--as-of", required=True, type=_as_of, help="end of the window (exclusive), YYYY-MM-DD")
    x.add_argument("--lookback-days", required=True, type=int, help="window length in days")
    add_source_option(x)
    x.set_defaults(handler=_extract)


def _generate(args: argparse.Namespace) -> int:
    from towerflow.config import Settings, WorldConfig
    from towerflow.data.synthetic import generate_world

    settings = Settings()
    overrides = {
        "n_users": args.users, "n_items": args.items, "n_topics": args.topics, "days": args.days,
        "events_per_day": args.events_per_day, "start": args.start, "seed": args.seed,
    }
    config = WorldConfig(**{k: v for k, v in overrides.items() if v is not None})
    summary = generate_world(args.out or settings.source, config)
    print(summary)
    return 0


def _import_movielens(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.data.movielens import import_movielens

    print(import_movielens(args.path, args.out or Settings().source, overwrite=args.force))
    return 0


def _import_interactions(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.data.interactions import import_interactions

    print(import_interactions(args.file, args.out or Settings().source, overwrite=args.force))
    return 0


def _extract(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource
    from towerflow.tasks.extract import extract

    settings = Settings()
    snapshot = extract(ParquetSource(args.source or settings.source), args.as_of, args.lookback_days,
                       settings.snapshots_dir)
    print(snapshot)
    return 0
