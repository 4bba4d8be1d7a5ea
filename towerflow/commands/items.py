"""``towerflow items``: new catalog items, retrievable before the next retrain (live items).

    towerflow items add FILE|- [--format ndjson|parquet] [--url http://HOST:PORT] [--batch-size 100]
        without --url: checks the whole file (the items table's rules; dense length as the table's) and adds its
        new items to the source's items table, all or nothing; a running service makes them live at its next
        re-read of the source (ServingConfig.events_reload_s), the next retrain folds them in.
        with --url: POSTs them to a running service's /items in batches (each accepted whole or refused whole;
        idempotent by item_id): embedded by the served release's item tower and retrievable at once.
"""

from __future__ import annotations

import argparse

from towerflow.commands.common import add_post_options

FORMATS = ("ndjson", "parquet")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("items", help="add new catalog items (retrievable before the next retrain)",
                       description="Live items: new catalog rows added to the source's items table, or posted to "
                                   "a running service that embeds them with its release's item tower.")
    isub = p.add_subparsers(dest="items_command", metavar="SUBCOMMAND")
    p.set_defaults(handler=lambda args: p.print_help() or 2)

    a = isub.add_parser("add", help="check and add a file of items (NDJSON, Parquet, or - for NDJSON on stdin)")
    a.add_argument("file", help="items file, or - to read NDJSON from stdin")
    a.add_argument("--format", choices=FORMATS, help="default: from the file's extension; stdin is NDJSON")
    add_post_options(a, "items", "/items", 100)
    a.set_defaults(handler=_add)


def _rows(path: str, fmt: str | None) -> tuple[list[dict], str]:
    from towerflow.commands.events import read_events_file
    from towerflow.serving.realtime.replay import item_rows

    if fmt is None and path != "-" and path.lower().endswith(".csv"):
        from towerflow.errors import TowerflowError

        raise TowerflowError(f"{path}: items carry a features list; use NDJSON or Parquet")
    rows, name = read_events_file(path, fmt)  # NDJSON keeps JSON's types, a bad line is named
    return (rows if isinstance(rows, list) else item_rows(rows)), name


def _add(args: argparse.Namespace) -> int:
    rows, name = _rows(args.file, args.format)
    if args.url:
        return _post(rows, name, args.url.rstrip("/"), args.batch_size, args.max_body_bytes)
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource
    from towerflow.serving.realtime.live import REDIS_SCHEMES, open_action_store
    from towerflow.serving.realtime.live_items import append_items, check_items, table_dense_dim

    settings = Settings()
    source = ParquetSource(settings.source)
    batch = check_items(rows, dense_dim=table_dense_dim(source.read_items()), where=name)
    # replicas sharing a Redis store may write the table from other hosts: take its lease too
    shared = open_action_store(settings) if (settings.realtime_uri or "").startswith(REDIS_SCHEMES) else None
    try:
        new = append_items(source, batch, settings.data_root / "items-table.lock", where=name, shared=shared)
    finally:
        if shared is not None:
            shared.close()
    print(f"{name}: {int(new.sum())} items added to {settings.source}/items.parquet, {int((~new).sum())} already "
          "there; a running service serves them after its next re-read of the source")
    return 0


def _post(rows: list[dict], name: str, url: str, max_items: int, max_bytes: int) -> int:
    from towerflow.commands.events import post_rows

    accepted, duplicates, last = post_rows(rows, name, url, "items", max_items, max_bytes)
    print(f"{name}: {accepted} items added, {duplicates} already in the items table (via {url}/items); release "
          f"{last.get('release')} serves {last.get('live_items')} live items")
    return 0
