"""Benchmark: FAISS index build time, search latency and ANN recall against exact search, for Flat, HNSW and
IVF-PQ, at 100k and 1M items.

    python -m bench.index [--sizes 100000 1000000] [--kinds flat ivfflat hnsw ivfpq] [--dim 64] [--queries 1000]
    python -m bench.index --served DATA_ROOT   (a served release's own vectors and searches: bench/index_served.py)

The vectors are clustered like trained item embeddings: ``n / 1000`` random unit centres (at least 10), each item a
centre plus isotropic noise of the same norm, L2-normalised (cosine to its own centre about 0.7). Queries are fresh
draws from the same mixture: user vectors land near the items they like, not on them. Each index is built and
measured with the product's own ``build_index`` / ``measure`` and ``IndexConfig`` defaults (HNSW32 efSearch 128,
IVF-Flat with ~4 sqrt(n) lists and nprobe 32, IVF-PQ with as many lists, PQ16x8, nprobe 32, SQ8 re-ranking of 8k
candidates). Latency is one query at a time
(the serving path); ``batch qps`` is all queries in one call. Builds use every core; searches use one FAISS thread
(``--search-threads``), as a serving process does per request: OpenMP threads on a busy machine spin-wait and
inflate single-query latency several times. Each size runs in a fresh process so its peak RSS is its own. Prints a
table and writes ``bench/results/index.json``. About 3 minutes for 100k and 10 for 1M on 2 cores (HNSW's build
dominates); ``--sizes 100000`` or ``--kinds flat ivfpq`` for less.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import command_line, peak_rss_mib, print_table, run_in_child, write_result

NOISE = 1.0  # noise norm relative to the unit centre


def clustered_vectors(n: int, dim: int, seed: int, n_clusters: int | None = None):
    """(n, dim) float32 unit vectors around ``n_clusters`` random unit centres; built in chunks (float32 only)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = n_clusters or max(10, n // 1000)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 262_144):
        m = min(262_144, n - start)
        x = centres[rng.integers(0, k, m)] + rng.standard_normal((m, dim), dtype=np.float32) * (NOISE / dim**0.5)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def _run(n: int, dim: int, kinds: list[str], n_queries: int, seed: int, build_threads: int | None,
         search_threads: int) -> dict:
    """Build and measure every kind over one set of n vectors (runs in a child process)."""
    import faiss
    import numpy as np

    from towerflow.config import IndexConfig
    from towerflow.tasks.build_index import build_index, measure
    from towerflow.tasks.embed_items import ItemEmbeddings

    build_threads = build_threads or faiss.omp_get_max_threads()
    t0 = time.perf_counter()
    vectors, _ = clustered_vectors(n + n_queries, dim, seed)
    queries, vectors = vectors[:n_queries], vectors[n_queries:]
    emb = ItemEmbeddings("bench", np.arange(n, dtype=np.int64), vectors)
    generate_s = time.perf_counter() - t0

    rows = []
    for kind in kinds:
        faiss.omp_set_num_threads(build_threads)
        index = build_index(emb, IndexConfig(kind=kind))
        faiss.omp_set_num_threads(search_threads)
        at10 = measure(index, emb, queries, 10)
        at100 = measure(index, emb, queries, 100)
        t1 = time.perf_counter()
        index.search(queries, 10)
        batch_s = time.perf_counter() - t1
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "index.faiss")
            faiss.write_index(index.index, path)
            size = os.path.getsize(path)
        rows.append({
            "n": n, "kind": kind, "factory": index.factory, "params": index.params,
            "build_s": round(index.build_seconds, 2),
            "p50_ms": round(at10.p50_ms, 3), "p99_ms": round(at10.p99_ms, 3),
            "p50_ms_at100": round(at100.p50_ms, 3),
            "recall_at_10": round(at10.recall_at_k, 4), "recall_at_100": round(at100.recall_at_k, 4),
            "batch_qps": round(n_queries / batch_s), "index_mib": round(size / 2**20, 1),
        })
        print(f"  n={n:,} {kind}: build {index.build_seconds:.1f}s, recall@10 {at10.recall_at_k:.3f}, "
              f"p50 {at10.p50_ms:.2f} ms", flush=True)
        del index
    return {"n": n, "dim": dim, "generate_s": round(generate_s, 2), "build_threads": build_threads,
            "search_threads": search_threads,
            "peak_rss_mib": round(peak_rss_mib(), 1), "rows": rows}


COLUMNS = [("items", "n", ","), ("index", "kind", ""), ("build s", "build_s", ".2f"),
           ("p50 ms", "p50_ms", ".3f"), ("p99 ms", "p99_ms", ".3f"), ("recall@10", "recall_at_10", ".4f"),
           ("recall@100", "recall_at_100", ".4f"), ("batch qps", "batch_qps", ","), ("MiB", "index_mib", ".1f")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", choices=("flat", "ivfflat", "hnsw", "ivfpq"),
                   default=["flat", "ivfflat", "hnsw", "ivfpq"])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="recall queries (the first 200 also time latency)")
    p.add_argument("--build-threads", type=int, help="FAISS threads while building (default: all cores)")
    p.add_argument("--search-threads", type=int, default=1, help="FAISS threads while searching (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--served", type=Path, metavar="DATA_ROOT",
                   help="instead: every index on DATA_ROOT's champion release's item vectors, replaying the searches "
                        "its service makes (bench/index_served.py)")
    p.add_argument("--requests", type=int, default=1200, help="--served: requests answered and recorded")
    p.add_argument("--batch", type=int, default=24, help="--served: requests per batch, as the batch worker gets them")
    p.add_argument("--hnsw-ef", type=int, nargs="+", default=[128, 256], help="--served: HNSW efSearch values")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64], help="--served: IVF-Flat nprobe values")
    args = p.parse_args(argv)
    if args.served:
        return _served(args, argv)

    runs = []
    for n in args.sizes:
        print(f"n={n:,} ...", flush=True)
        runs.append(run_in_child(_run, n=n, dim=args.dim, kinds=args.kinds, n_queries=args.queries,
                                 seed=args.seed, build_threads=args.build_threads,
                                 search_threads=args.search_threads))
    rows = [r for run in runs for r in run["rows"]]
    print_table(rows, COLUMNS, title=f"FAISS indexes, d={args.dim}, {args.queries} queries; build on "
                                     f"{runs[0]['build_threads']} thread(s), search on {args.search_threads}; "
                                     "latency = 1 query at k=10")
    for run in runs:
        print(f"n={run['n']:,}: peak RSS {run['peak_rss_mib']:,.0f} MiB")
    result = {"dim": args.dim, "queries": args.queries, "noise": NOISE, "runs": runs}
    write_result("index", result, command_line("bench.index", argv))
    return result


def _served(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from bench import index_served

    result = index_served.run(args.served.resolve(), args.requests, args.batch, args.hnsw_ef, args.nprobe)
    print_table(result["rows"], index_served.COLUMNS,
                title=f"{result['n_items']:,} items, d={result['dim']}: {result['searched_queries']} served queries "
                      f"replayed on 1 thread; recall against exact search (ties counted as the index gate does)")
    write_result("index_served", result, command_line("bench.index", argv))
    return result


if __name__ == "__main__":
    main()
