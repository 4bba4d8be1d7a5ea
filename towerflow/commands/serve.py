"""``towerflow serve``: run the retrieval service, ask it one query in-process, or refresh the user states.

    towerflow serve [--host 127.0.0.1] [--port 8000] [--docs] [--max-body-bytes 65536]
                                                              the HTTP service (serving/app.py) under uvicorn
    towerflow serve query USER_ID [--context-item ID] [--surface related] [--query TEXT] [-k 10]
                      [--rank [--candidates 200]]             one retrieval (--rank: retrieval + the release's
                                                              ranker, as POST /recommend) from the champion, no server
    towerflow serve refresh [--release champion] [--as-of T]   the refresh-user-states flow, here
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from towerflow.commands.common import add_source_option, positive_int, prefect_api


def _serving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias", default="champion", help="registry alias to serve and watch (default champion)")
    p.add_argument("--mode", choices=("hybrid", "online"), default="hybrid",
                   help="hybrid: stored history states + live context (default); online: encode every history "
                        "per request")
    p.add_argument("--on-missing-state", choices=("recompute", "cold"), default="recompute",
                   help="a user with no state for the served release: recompute online (default) or answer as "
                        "an unknown user")
    p.add_argument("--as-of", type=datetime.fromisoformat,
                   help="pin the serving clock, for replayed data (default: min(now, end of the source's last day))")
    p.add_argument("--lookback-days", type=int, default=None,
                   help="days of events kept for online histories (default: the history's max age, 365)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op and FAISS OpenMP threads (default 1: requests run in parallel; per-op "
                        "threading of small batches only adds contention)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the retrieval service, query it in-process, refresh user states",
                       description="Serve POST /retrieve, POST /recommend, GET /healthz, GET /release for the champion "
                                   "release; "
                                   "a new champion is loaded and swapped in without a restart.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between checks of the alias (default 5)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--docs", action="store_true", help="also serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--batch-max-size", type=int, default=32,
                   help="most /retrieve requests answered together (default 32; 1: one at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="longest a request waits for others while a worker is free (default 0: batches form "
                        "only while the workers are busy)")
    p.add_argument("--batch-threads", type=int, default=1, help="worker threads answering batches (default 1)")
    p.add_argument("--max-body-bytes", type=positive_int, default=64 * 1024,
                   help="largest request body accepted; a longer one is refused with 413 while it is read "
                        "(default 65536)")
    _serving_options(p)
    p.set_defaults(handler=_serve)
    ssub = p.add_subparsers(dest="serve_command", metavar="SUBCOMMAND")

    q = ssub.add_parser("query", help="print one retrieval from the served release, without a server")
    q.add_argument("user_id", type=int)
    q.add_argument("--context-item", type=int, help="the item being viewed, if any")
    q.add_argument("--surface", choices=("homefeed", "related", "search"), default="homefeed")
    q.add_argument("--query", help="what the user searched (with --surface search)")
    q.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    q.add_argument("--include-seen", action="store_true", help="keep items the user already acted on")
    q.add_argument("--rank", action="store_true", help="rank the retrieved candidates with the release's ranker "
                                                       "(as POST /recommend; seen items are always excluded)")
    q.add_argument("--candidates", type=positive_int, default=200,
                   help="with --rank: how many retrieved items the ranker scores (default 200)")
    q.add_argument("--json", action="store_true", help="print the response as JSON")
    _serving_options(q)
    q.set_defaults(handler=_query)

    r = ssub.add_parser("refresh", help="compute and store user history states (the refresh-user-states flow)")
    r.add_argument("--release", default="champion", help="alias, version number or release id (default champion)")
    r.add_argument("--as-of", type=datetime.fromisoformat, help="default: the source's horizon")
    r.add_argument("--lookback-days", type=int, default=None,
                   help="days of events read (default: the release's max history age)")
    add_source_option(r)
    r.set_defaults(handler=_refresh)


def _config(args: argparse.Namespace, **extra):
    from towerflow.serving.config import ServingConfig

    return ServingConfig(alias=args.alias, mode=args.mode, on_missing_state=args.on_missing_state, as_of=args.as_of,
                         lookback_days=args.lookback_days, **extra)


def _threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(max(1, n))
    # FAISS's OpenMP threads spin after a search, waiting for the next one, on the cores the HTTP loop and the batch
    # worker need (measured at 1 client on 2 busy cores: 2.4 ms of server CPU per request with them, 1.4 without)
    faiss.omp_set_num_threads(max(1, n))


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from towerflow.config import Settings
    from towerflow.serving.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _threads(args.torch_threads)
    app = create_app(Settings(), _config(args, poll_interval_s=args.poll_s, docs=args.docs,
                                         max_body_bytes=args.max_body_bytes, batch_max_size=args.batch_max_size,
                                         batch_wait_ms=args.batch_wait_ms, batch_threads=args.batch_threads))
    docs = ", GET /docs" if args.docs else ""
    print(f"serving on http://{args.host}:{args.port} (POST /retrieve, POST /recommend, GET /healthz, "
          f"GET /release{docs})",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def _query(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.serving.service import RetrievalService

    _threads(args.torch_threads)
    service = RetrievalService(Settings(), _config(args)).start(watch=False)
    if args.rank:
        if args.include_seen:
            raise SystemExit("towerflow serve query: --rank always excludes seen items; drop --include-seen")
        out = service.recommend(args.user_id, args.context_item, args.surface, args.k, args.candidates, args.query)
    else:
        out = service.retrieve(args.user_id, args.context_item, args.surface, args.k, not args.include_seen,
                               args.query)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    ctx = f"viewing item {args.context_item} on {args.surface}" if args.context_item is not None else args.surface
    ctx += f" searching {args.query!r}" if args.query else ""
    print(f"release {out['release']} (version {out['version']}) - user {args.user_id}, {ctx}, via {out['path']}")
    if args.rank:
        print(f"ranked {args.candidates} retrieved candidates by the release's ranker")
    for rank, item in enumerate(out["items"], 1):
        heads = "  " + " ".join(f"{h} {p:.3f}" for h, p in item["heads"].items()) if "heads" in item else ""
        print(f"{rank:>4}. item {item['item_id']:<10} {item['score']:.4f}{heads}")
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.flows.refresh_user_states import refresh_user_states

    with prefect_api(Settings()):  # a temporary API that dies with this process if none is configured
        result = refresh_user_states(release=args.release, as_of=args.as_of, lookback_days=args.lookback_days,
                                     source_uri=args.source)
    print(f"stored {result.n_users} user states for release {result.release_id} (version {result.version}) "
          f"as of {result.as_of.isoformat()} in {result.seconds:.1f}s -> {result.store}")
    return 0
