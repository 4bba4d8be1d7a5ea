"""``towerflow events``: live events into the realtime action store, and from there into the event source.

    towerflow events ingest FILE|- [--format ndjson|csv|parquet] [--url http://HOST:PORT] [--batch-size 300]
        without --url: checks the whole file (the data gate's rules, the source's users and items tables) and
        writes it to the action store (TOWERFLOW_REALTIME_URI, default <data_root>/realtime.sqlite) in one
        transaction, all or nothing; a running service reads the same store.
        with --url: POSTs it to a running service's /events in batches (each accepted whole or refused whole;
        idempotent by event_id, so re-running after a refusal or a crash stores nothing twice).
    towerflow events compact [--max-rows N] [--keep-per-user N]
        hands every acknowledged event not yet in the source to its day partitions (exactly once), then drops
        from the store the compacted events beyond each user's last N actions (default: what /retrieve reads,
        ServingConfig.realtime_max_actions; 0 keeps everything)
    towerflow events replay --day D --url http://HOST:PORT [--speed X] [--from URI] [--limit N] [-k 10] [--json]
                            [--no-items]
        replays day D of a source (default: the settings' source) into a running service in time order, asking
        /retrieve before each engagement; prints recall@k of the engaged items. The items created that day are
        POSTed to /items at their creation time (live items), unless --no-items.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from towerflow.commands.common import add_post_options

FORMATS = ("ndjson", "csv", "parquet")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="ingest live events, compact them into the event source",
                       description="Live events: ingest into the realtime action store (or a running service), "
                                   "compact the store into the event source's day partitions.")
    esub = p.add_subparsers(dest="events_command", metavar="SUBCOMMAND")
    p.set_defaults(handler=lambda args: p.print_help() or 2)

    i = esub.add_parser("ingest", help="check and store a file of events (NDJSON, CSV, Parquet, or - for stdin)")
    i.add_argument("file", help="events file, or - to read NDJSON from stdin")
    i.add_argument("--format", choices=FORMATS, help="default: from the file's extension (.ndjson/.jsonl, .csv, "
                                                     ".parquet); stdin is NDJSON")
    add_post_options(i, "events", "/events", 300)
    i.set_defaults(handler=_ingest)

    r = esub.add_parser("replay", help="replay a day of a source into a running service, asking /retrieve before "
                                       "each engagement")
    r.add_argument("--day", required=True, type=date.fromisoformat, help="the day to replay (YYYY-MM-DD)")
    r.add_argument("--url", required=True, help="the running service (http://HOST:PORT)")
    r.add_argument("--speed", type=float, help="keep the day's pace, X times faster (default: as fast as possible)")
    r.add_argument("--from", dest="source", help="source to read the day from (default: the settings' source)")
    r.add_argument("--limit", type=int, help="replay only the day's first N events")
    r.add_argument("-k", type=int, default=10, help="items asked for before each engagement (default 10)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.add_argument("--no-items", dest="items", action="store_false",
                   help="do not POST the items created that day to /items (they are still counted apart)")
    r.set_defaults(handler=_replay)

    c = esub.add_parser("compact", help="move acknowledged events from the action store into the event source")
    c.add_argument("--max-rows", type=int, default=100_000, help="events per file at most (default 100000)")
    c.add_argument("--keep-per-user", type=int, default=None,
                   help="after compacting, keep each user's last N actions in the store (default: "
                        "ServingConfig.realtime_max_actions, what /retrieve reads; 0: prune nothing)")
    c.set_defaults(handler=_compact)


def read_events_file(path: str, fmt: str | None = None) -> tuple[list[dict] | object, str]:
    """(records or a DataFrame, its name for messages). NDJSON keeps JSON's types; a bad line is named."""
    import pandas as pd

    from towerflow.errors import TowerflowError

    name = "<stdin>" if path == "-" else path
    if fmt is None:
        ext = Path(path).suffix.lower()
        fmt = "ndjson" if path == "-" or ext in (".ndjson", ".jsonl", ".json") else ext.lstrip(".")
    if fmt not in FORMATS:
        raise TowerflowError(f"{name}: cannot tell the format from {Path(path).suffix!r}; pass --format "
                             f"{'|'.join(FORMATS)}")
    if path != "-" and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "parquet":
        return pd.read_parquet(path), name
    if fmt == "csv":
        text = {c: str for c in ("event_id", "action", "surface", "query", "ts")}
        return pd.read_csv(sys.stdin if path == "-" else path, dtype=text, keep_default_na=False,
                           na_values={"context_item_id": [""], "query": [""]}), name
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    records = []
    try:
        for n, line in enumerate(stream, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TowerflowError(f"{name}, line {n}: not JSON ({exc.msg})") from None
    finally:
        if stream is not sys.stdin:
            stream.close()
    return records, name


def _ingest(args: argparse.Namespace) -> int:
    rows, name = read_events_file(args.file, args.format)
    if args.url:
        return _post(rows, name, args.url.rstrip("/"), args.batch_size, args.max_body_bytes)
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource, SourceError
    from towerflow.serving.realtime.live import LiveEvents, open_action_store

    settings = Settings()
    try:
        source = ParquetSource(settings.source)
    except SourceError:
        source = None
        print(f"warning: no event source at {settings.source}: user and item ids not checked", file=sys.stderr)
    store = open_action_store(settings)
    try:
        out = LiveEvents(store, source).ingest(rows, where=name)
    finally:
        store.close()
    print(f"{name}: {out['accepted']} events stored, {out['duplicates']} already stored "
          f"(store {settings.realtime_uri or settings.realtime_path}, last seq {out['last_seq']})")
    return 0


def batch_bodies(rows: list[dict], max_events: int, max_bytes: int,
                 key: str = "events") -> Iterator[tuple[int, int, bytes]]:
    """``(first_row, n_rows, body)`` for each POST: ``{"<key>": [...]}`` of at most ``max_events`` rows and at most
    ``max_bytes`` bytes, rows in order. A row that cannot fit a body alone is a ``TowerflowError`` naming it."""
    from towerflow.errors import TowerflowError

    head, tail = b'{"' + key.encode() + b'": [', b"]}"
    start, parts, size = 0, [], len(head) + len(tail)
    for i, row in enumerate(rows):
        part = json.dumps(row).encode()
        extra = len(part) + (2 if parts else 0)  # ", " between rows
        if parts and (len(parts) == max_events or size + extra > max_bytes):
            yield start, len(parts), head + b", ".join(parts) + tail
            start, parts, size = i, [], len(head) + len(tail)
            extra = len(part)
        if size + extra > max_bytes:
            raise TowerflowError(f"row {i} alone is {len(part):,} bytes of JSON: over the body limit of "
                                 f"{max_bytes:,} bytes")
        parts.append(part)
        size += extra
    if parts:
        yield start, len(parts), head + b", ".join(parts) + tail


def post_rows(rows: list[dict], name: str, url: str, key: str, max_rows: int,
              max_bytes: int) -> tuple[int, int, dict]:
    """POST ``rows`` to ``<url>/<key>`` as ``{"<key>": [...]}`` batches (``batch_bodies``) -> (accepted, duplicates,
    the last reply). A refused batch is a TowerflowError naming its rows, the bad row and what was stored before."""
    import urllib.error
    import urllib.request

    from towerflow.errors import TowerflowError

    accepted = duplicates = 0
    out: dict = {}
    for start, n, body in batch_bodies(rows, max_rows, max_bytes, key=key):
        req = urllib.request.Request(f"{url}/{key}", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                out = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            reply = json.loads(exc.read() or b"{}")
            row = reply.get("row")
            at = f" (row {start + row} of {name})" if isinstance(row, int) else ""
            raise TowerflowError(f"{url}/{key} refused the batch of rows {start}..{start + n - 1} with "
                                 f"{exc.code}: {reply.get('detail', exc.reason)}{at}; {accepted} {key} stored "
                                 "before it") from None
        except urllib.error.URLError as exc:
            raise TowerflowError(f"{url}: cannot reach the service ({exc.reason})") from None
        accepted, duplicates = accepted + out["accepted"], duplicates + out["duplicates"]
    return accepted, duplicates, out


def _post(rows, name: str, url: str, max_events: int, max_bytes: int) -> int:
    if not isinstance(rows, list):  # a table: its rows as JSON objects (timestamps ISO-8601)
        rows = json.loads(rows.to_json(orient="records", date_format="iso", date_unit="us"))
    accepted, duplicates, _ = post_rows(rows, name, url, "events", max_events, max_bytes)
    print(f"{name}: {accepted} events stored, {duplicates} already stored (via {url}/events)")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.realtime.compact import compact
    from towerflow.serving.realtime.live import open_action_store

    settings = Settings()
    keep = ServingConfig().realtime_max_actions if args.keep_per_user is None else args.keep_per_user
    store = open_action_store(settings)
    try:
        out = compact(store, settings.source, max_rows=max(1, args.max_rows))
        pruned = store.prune(keep) if keep > 0 else 0
    finally:
        store.close()
    print(f"compacted {out.events} events into {len(out.files)} files of {settings.source}; "
          f"high water {out.high_water}; {pruned} compacted events pruned from the store")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource
    from towerflow.errors import TowerflowError
    from towerflow.serving.realtime.replay import Client, replay

    source = ParquetSource(args.source or Settings().source)
    events = source.read_day(args.day)
    if len(events) == 0:
        raise TowerflowError(f"{source.uri}: no events on {args.day.isoformat()} (days: "
                             f"{', '.join(d.isoformat() for d in source.days()[-5:])} ...)")
    if args.limit is not None:
        events = events.sort_values(["ts", "event_id"]).head(max(0, args.limit))
    items = source.read_items()
    created = items[items["created_ts"].dt.date == args.day]
    client = Client(args.url)
    try:
        out = replay(events, client, k=args.k, speed=args.speed, items=created, post_items=args.items)
    finally:
        client.close()
    if args.json:
        print(json.dumps(out.to_dict(), indent=2))
    else:
        print(f"replayed {out.events} events of {args.day.isoformat()} in {out.seconds:.1f}s: "
              f"{out.engagements} engagements, recall@{args.k} {out.recall:.4f} ({out.hits} hits); "
              f"answers by path {out.paths}")
        if len(created):
            d = out.to_dict()
            print(f"{len(created)} items created that day ({out.items} posted to /items): "
                  f"{out.created_engagements} engagements with them, recall@{args.k} "
                  f"{d['recall_at_k_created_items']:.4f}")
    return 0
