"""``python -m bench.index --served DIR``: FAISS indexes on a served release's own vectors and the searches serving
actually makes, against exact search.

    python -m bench.index --served /tmp/h1-floor/items-100000 [--requests 1200] [--batch 24]

``DIR`` is a data root with a champion release and its stored user states (``python -m bench.serving --floor
--data-root D`` leaves one in ``D/items-<n>``). A ``RetrievalService`` answers ``--requests`` of bench.serving's
requests (a third homefeed, related, search) in batches of ``--batch``, as its batch worker does under load, and
every ``release.search(u, depth)`` call it makes is recorded: the user vectors and the depths
(``retrieval.search_depth``: k + |seen| rounded up to a power of two) serving asks. Each candidate index, built
from the release's item vectors with the product's ``build_index``, then replays those calls on one thread:

- CPU per query (thread time) replaying the calls as recorded (``batched``: a depth bucket of a batch per call)
  and one query at a time (``single``: concurrency 1), the better of two passes;
- recall@10 (of each search's first 10) and recall@depth against exact search, counting ties as the index gate
  does (``validation.index.check_index_recall``).

``flat, one batch`` searches each batch's queries in one call at the batch's deepest depth (what exact search
could do, as its answer at a smaller depth is a prefix). Writes ``bench/results/index_served.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Column

COLUMNS: list[Column] = [("index", "name", ""), ("build s", "build_s", ".1f"),
                         ("us/query batched", "us_batched", ".1f"), ("us/query single", "us_single", ".1f"),
                         ("recall@10", "recall_at_10", ".4f"), ("recall@depth", "recall_at_depth", ".4f")]


def record_searches(root: Path, n_requests: int, batch: int) -> tuple[Any, list[tuple[int, np.ndarray, int]]]:
    """Answer ``n_requests`` bench requests with a RetrievalService over ``root`` in batches of ``batch`` -> (the
    release, [(batch number, u (r, d) float32, depth)] for every index search serving made)."""
    from bench.serving import _requests
    from towerflow.config import Settings
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import Query, RetrievalService

    os.environ["TOWERFLOW_DATA_ROOT"] = str(root)
    svc = RetrievalService(Settings(data_root=root), ServingConfig()).start(watch=False)
    calls: list[tuple[int, np.ndarray, int]] = []
    try:
        release = svc.bundle.release
        served = release.search
        current = [0]

        def recording(u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            calls.append((current[0], np.array(u, dtype=np.float32), int(k)))
            return served(u, k)

        release.search = recording  # this instance only, for the run: what serving searches, as it searches it
        queries = [Query(r["user_id"], r.get("context", {}).get("item_id"), r.get("context", {}).get("surface",
                         "homefeed"), r["k"]) for r in _requests(root, n_requests)]
        for current[0], start in enumerate(range(0, len(queries), batch)):
            svc.retrieve_batch(queries[start:start + batch])
        del release.search
    finally:
        svc.close()
    return release, calls


def _candidates(emb: Any, hnsw_ef: list[int], nprobes: list[int]) -> list[tuple[str, Any, Any, float]]:
    """(name, faiss index, search params or None, build seconds) for each index to compare."""
    import faiss

    from towerflow.config import IndexConfig
    from towerflow.tasks.build_index import build_index

    out = []
    hnsw = build_index(emb, IndexConfig(kind="hnsw"))
    for ef in hnsw_ef:
        out.append((f"HNSW32 efSearch {ef}", hnsw.index, faiss.SearchParametersHNSW(efSearch=ef), hnsw.build_seconds))
    ivf = build_index(emb, IndexConfig(kind="ivfflat"))
    for nprobe in nprobes:
        out.append((f"IVF{ivf.params['nlist']},Flat nprobe {nprobe}", ivf.index,
                    faiss.SearchParametersIVF(nprobe=nprobe), ivf.build_seconds))
    pq = build_index(emb, IndexConfig(kind="ivfpq"))
    out.append((f"IVF-PQ + SQ8 refine (nprobe {pq.params['nprobe']})", pq.index, None, pq.build_seconds))
    flat = build_index(emb, IndexConfig(kind="flat"))
    out.append(("Flat", flat.index, None, flat.build_seconds))
    return out


def _replay(index: Any, params: Any, calls: list[tuple[int, np.ndarray, int]], one_batch: bool = False,
            passes: int = 2) -> tuple[list[np.ndarray], float]:
    """Search every call -> (ids (r, depth) per call, best-of-``passes`` thread seconds). ``one_batch``: each batch's
    queries in one search at its deepest depth, cut back to each call's depth."""
    kw = {} if params is None else {"params": params}
    best, got = float("inf"), []
    for _ in range(passes):
        got = []
        t0 = time.thread_time()
        if one_batch:
            for b in sorted({c[0] for c in calls}):
                mine = [c for c in calls if c[0] == b]
                _, ids = index.search(np.concatenate([u for _, u, _ in mine]), max(d for _, _, d in mine), **kw)
                start = 0
                for _, u, d in mine:
                    got.append(ids[start:start + len(u), :d])
                    start += len(u)
        else:
            got = [index.search(u, d, **kw)[1] for _, u, d in calls]
        best = min(best, time.thread_time() - t0)
    return got, best


def _single(index: Any, params: Any, calls: list[tuple[int, np.ndarray, int]], passes: int = 2) -> float:
    """Best-of-``passes`` thread seconds searching every recorded query alone at its depth."""
    kw = {} if params is None else {"params": params}
    best = float("inf")
    for _ in range(passes):
        t0 = time.thread_time()
        for _, u, d in calls:
            for row in u:
                index.search(row[None, :], d, **kw)
        best = min(best, time.thread_time() - t0)
    return best


def _recall(vectors: np.ndarray, item_ids: np.ndarray, calls: list[tuple[int, np.ndarray, int]],
            got: list[np.ndarray], k: int | None) -> float:
    """Mean recall (the index gate's, ties counted) of ``got`` over every recorded query: at ``k`` (each search's
    first k), or at its own depth when ``k`` is None."""
    from towerflow.config import GateConfig
    from towerflow.validation.index import check_index_recall

    total, n = 0.0, 0
    for depth in sorted({d for _, _, d in calls}):
        sel = [i for i, c in enumerate(calls) if c[2] == depth]
        q = np.concatenate([calls[i][1] for i in sel])
        ids = np.concatenate([got[i] for i in sel])
        kk = depth if k is None else min(k, depth)
        check = check_index_recall(lambda _q, _k, ids=ids, kk=kk: (None, ids[:, :kk]), vectors, q, kk,
                                   GateConfig(), item_ids=item_ids).checks[0]
        total += float(check.observed) * len(q)
        n += len(q)
    return total / n


def run(root: Path, n_requests: int, batch: int, hnsw_ef: list[int], nprobes: list[int]) -> dict[str, Any]:
    """Record serving's searches over ``root``'s champion, then build, replay and score every candidate."""
    import faiss
    import torch

    from towerflow.tasks.embed_items import ItemEmbeddings

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    release, calls = record_searches(root, n_requests, batch)
    vectors = np.ascontiguousarray(release.item_vectors, dtype=np.float32)
    item_ids = np.asarray(release.item_ids, dtype=np.int64)
    emb = ItemEmbeddings(release.release_id, item_ids, vectors)
    n_q = sum(len(u) for _, u, _ in calls)
    depths, counts = np.unique(np.concatenate([[d] * len(u) for _, u, d in calls]), return_counts=True)
    print(f"release {release.release_id} ({release.index_meta.get('kind', '?')} index): {len(item_ids):,} items; "
          f"{n_q} searched queries in {len(calls)} searches; depths "
          + ", ".join(f"{d}: {c}" for d, c in zip(depths.tolist(), counts.tolist(), strict=True)), flush=True)
    rows = []
    candidates = _candidates(emb, hnsw_ef, nprobes)
    candidates.append(("Flat, one batch", candidates[-1][1], None, candidates[-1][3]))
    for name, index, params, build_s in candidates:
        got, batched = _replay(index, params, calls, one_batch=name == "Flat, one batch")
        single = _single(index, params, calls[: max(1, len(calls) // 4)])
        n_single = sum(len(u) for _, u, _ in calls[: max(1, len(calls) // 4)])
        rows.append({"name": name, "build_s": round(build_s, 2), "us_batched": round(batched / n_q * 1e6, 1),
                     "us_single": round(single / n_single * 1e6, 1),
                     "recall_at_10": round(_recall(vectors, item_ids, calls, got, 10), 4),
                     "recall_at_depth": round(_recall(vectors, item_ids, calls, got, None), 4)})
        print(f"  {name}: {rows[-1]['us_batched']} us/query, recall@10 {rows[-1]['recall_at_10']}", flush=True)
    return {"data_root": str(root), "release": release.release_id, "served_index": release.index_meta,
            "n_items": len(item_ids), "dim": int(vectors.shape[1]), "requests": n_requests, "batch": batch,
            "searched_queries": n_q, "searches": len(calls),
            "depths": dict(zip(map(str, depths.tolist()), counts.tolist(), strict=True)), "rows": rows}
