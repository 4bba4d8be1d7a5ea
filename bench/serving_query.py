"""``python -m bench.serving --query-latency``: ``/retrieve`` with a search query against without, in process (#18).

    python -m bench.serving --query-latency [--pairs 2000] [--data-root DIR]

One release of a 5,000-item synthetic world (``bench.serving_floor.prepare_world``: the real retrain flow, the
default model, promoted, user states stored; reused from ``--data-root`` when it holds one). ONE
``RetrievalService`` (hybrid, as served; torch and FAISS on 1 thread) answers ``--pairs`` pairs of requests for users
with a stored state: the same user on the ``search`` surface once with a query (a query users typed in the world's
search events) and once without, the pair's order alternating, so both kinds see the same users, caches and load.
The first 100 pairs warm up. Reported: p50 / p99 / mean of each kind and the ratios; target (issue #18): p99 with a
query within 10% of without. Also timed alone: the query's own work per request (tokenizing, ``encode_texts``).
Writes ``bench/results/serving_query.json``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving import _pct, _table

WARMUP = 100
TARGET_P99_RATIO = 1.10


def _queries(root: Path, as_of: str) -> list[str]:
    """The distinct queries of the world's last day of search events (what users typed)."""
    from datetime import UTC, datetime

    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource

    end = datetime.fromisoformat(as_of)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    events = ParquetSource(Settings(data_root=root).source).read_events(end - timedelta(days=1), end)
    queries = events.loc[events["surface"] == "search", "query"].dropna().unique().tolist()
    if not queries:
        raise RuntimeError(f"{root}: the world's last day has no search queries")
    return sorted(queries)


def _users(root: Path, release: str) -> list[int]:
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource
    from towerflow.serving.state_store import SQLiteUserStateStore

    settings = Settings(data_root=root)
    users = sorted(int(u) for u in ParquetSource(settings.source).read_users()["user_id"])
    return sorted(SQLiteUserStateStore(settings.user_states_path).get(users, release))


def measure(root: Path, info: dict[str, Any], pairs: int, seed: int = 0) -> dict[str, Any]:
    import faiss
    import torch

    from towerflow.config import Settings
    from towerflow.models.query import encode_texts
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    queries, users = _queries(root, info["as_of"]), _users(root, info["champion"]["release"])
    rng = np.random.default_rng(seed)
    plan = [(int(rng.choice(users)), str(rng.choice(queries))) for _ in range(pairs)]
    lat: dict[str, list[float]] = {"query": [], "no_query": []}
    paths: dict[str, dict[str, int]] = {"query": {}, "no_query": {}}
    svc = RetrievalService(Settings(data_root=root), ServingConfig(mode="hybrid")).start(watch=False)
    try:
        for i, (user, query) in enumerate(plan):
            kinds = ("query", "no_query") if i % 2 == 0 else ("no_query", "query")  # neither always goes first
            for kind in kinds:
                t0 = time.perf_counter()
                out = svc.retrieve(user, None, "search", 10, query=query if kind == "query" else None)
                ms = (time.perf_counter() - t0) * 1e3
                if i >= WARMUP:
                    lat[kind].append(ms)
                    paths[kind][out["path"]] = paths[kind].get(out["path"], 0) + 1
    finally:
        svc.close()
    # the query's own work, outside the service: what the request with a query does in addition
    t0 = time.perf_counter()
    for _, query in plan:
        encode_texts([query])
    tokenize_ms = (time.perf_counter() - t0) * 1e3 / len(plan)
    q, n = np.array(lat["query"]), np.array(lat["no_query"])
    ratios = {"p50": round(float(np.percentile(q, 50) / np.percentile(n, 50)), 3),
              "p99": round(float(np.percentile(q, 99) / np.percentile(n, 99)), 3),
              "mean": round(float(q.mean() / n.mean()), 3)}
    return {"pairs": pairs, "warmup_pairs": WARMUP, "distinct_queries": len(queries), "users": len(users),
            "query": {**_pct(q), "mean_ms": round(float(q.mean()), 3), "paths": paths["query"]},
            "no_query": {**_pct(n), "mean_ms": round(float(n.mean()), 3), "paths": paths["no_query"]},
            "ratio_query_over_no_query": ratios, "tokenize_ms_per_query": round(tokenize_ms, 4),
            "target_p99_ratio": TARGET_P99_RATIO, "met": ratios["p99"] <= TARGET_P99_RATIO}


def run(root: Path, pairs: int) -> dict[str, Any]:
    from bench.serving_floor import prepare_world

    if pairs <= WARMUP:  # before minutes of setup: the warm-up pairs are not timed, nothing would be left to report
        raise ValueError(f"--pairs must be more than the {WARMUP} warm-up pairs, got {pairs}")
    t0 = time.perf_counter()
    info = prepare_world(root, 5_000)
    print(f"release {info['champion']['release']} (setup {time.perf_counter() - t0:.0f} s)", flush=True)
    return {"world": info, **measure(root, info, pairs)}


def report(result: dict[str, Any]) -> str:
    q, n, r = result["query"], result["no_query"], result["ratio_query_over_no_query"]
    rows = [("", "requests", "p50 ms", "p99 ms", "mean ms", "max ms"),
            *[(name, str(m["n"]), f"{m['p50_ms']:.3f}", f"{m['p99_ms']:.3f}", f"{m['mean_ms']:.3f}",
               f"{m['max_ms']:.2f}") for name, m in (("search, with a query", q), ("search, no query", n))]]
    table = _table(rows)
    verdict = "met" if result["met"] else "NOT met"
    return (f"in process, one service, {result['pairs']} alternating pairs ({result['warmup_pairs']} warm-up), "
            f"{result['users']} users, {result['distinct_queries']} distinct queries\n{table}\n"
            f"with / without a query: p50 x{r['p50']}, p99 x{r['p99']}, mean x{r['mean']} "
            f"(target p99 <= x{result['target_p99_ratio']}: {verdict}); tokenizing alone "
            f"{result['tokenize_ms_per_query']} ms per query")
