"""Build the FAISS index of a release's item vectors, save it with its sidecar, and measure it against exact search.

Every index answers with real item ids (``add_with_ids``), uses inner product (the towers L2-normalise, so this is
cosine), and is chosen by catalog size and config:

- ``flat``: exact ``IDMap2,Flat``; ``auto`` picks it up to ``flat_max_items``.
- ``ivfflat``: ``IVF{nlist},Flat`` (exact scores over the ``nprobe`` lists nearest the query); ``auto`` beyond
  ``flat_max_items`` up to ``ivf_flat_max_items``. Trained (k-means) on a sample of the vectors.
- ``hnsw``: ``IDMap2,HNSW{m}`` (HNSW cannot ``add_with_ids`` itself); ``auto`` beyond ``ivf_flat_max_items``.
- ``ivfpq``: ``IVF{nlist},PQ{m}x{nbits}``, optionally re-ranked (``Refine(SQ8)`` / ``RFlat``, wrapped in
  ``IDMap2`` because the refine stage cannot take ids); only on request. Trained on a sample of the vectors.

The sidecar ``index.json`` carries the release id, model version, item count, dim, index type and parameters, the
sha256 of the index file and the content hash of the embeddings it was built from, and the build time.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from towerflow.config import IndexConfig
from towerflow.errors import TowerflowError
from towerflow.tasks.embed_items import ItemEmbeddings

INDEX_FILE = "index.faiss"
META_FILE = "index.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in chunks; one checksum for index sidecars and release manifests."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class IndexBuildError(TowerflowError):
    """The index cannot be built from these vectors with this config, or a saved index is not what it claims."""




@dataclass
class IndexArtifact:
    """A built FAISS index plus what the sidecar records about it."""

    index: faiss.Index
    release_id: str
    model_version: str
    kind: str  # "flat" | "ivfflat" | "hnsw" | "ivfpq"
    factory: str  # the faiss.index_factory string
    params: dict[str, Any]
    n_items: int
    dim: int
    embeddings_sha256: str
    build_seconds: float
    index_sha256: str = ""  # set by save / load

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (b, d) -> (scores (b, k) float32, item ids (b, k) int64; -1 where fewer than k items)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexBuildError(f"queries must be (batch, {self.dim}), got {q.shape}")
        return search_index(self.index, self.kind, self.params, self.n_items, q, k)

    def metadata(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would deep-copy the FAISS index.
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "index"}
        meta["metric"] = "inner_product"
        meta["faiss_version"] = faiss.__version__
        return meta

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and the ``index.json`` sidecar into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        self.index_sha256 = file_sha256(directory / INDEX_FILE)
        (directory / META_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> IndexArtifact:
        """Read what :meth:`save` wrote; with ``verify`` the index file must match the sidecar's sha256."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise IndexBuildError(f"{meta_path} is missing: an index without its sidecar cannot be trusted")
        meta = json.loads(meta_path.read_text())
        if verify and file_sha256(directory / INDEX_FILE) != meta["index_sha256"]:
            raise IndexBuildError(f"{directory / INDEX_FILE} does not match the sha256 in {META_FILE}")
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.ntotal != meta["n_items"] or index.d != meta["dim"]:
            raise IndexBuildError(f"{directory / INDEX_FILE} holds {index.ntotal}x{index.d}, "
                                  f"{META_FILE} says {meta['n_items']}x{meta['dim']}")
        _apply_search_params(index, meta["kind"], meta["params"])
        return cls(index=index, **{f.name: meta[f.name] for f in fields(cls) if f.name != "index"})


def choose_kind(n_items: int, config: IndexConfig) -> str:
    """``auto`` is exact up to ``flat_max_items`` (exact search is cheap there and recall is 1), IVF-Flat up to
    ``ivf_flat_max_items``, HNSW beyond.

    Why IVF-Flat in the middle: on a 100k-item release's own item vectors and its served requests' user vectors,
    IVF-Flat (4 sqrt(n) lists, nprobe 32) searched serving's depths in half the CPU of HNSW32 (efSearch 128) at
    recall@10 0.99 against HNSW's 0.89 (``python -m bench.index --served DIR``), and on clustered synthetic vectors
    it was faster at 1M items too (``python -m bench.index``). Its cost grows with sqrt(n) (lists and list lengths
    both do), HNSW's about with log(n): beyond what was measured, HNSW.
    """
    if config.kind != "auto":
        return config.kind
    if n_items <= config.flat_max_items:
        return "flat"
    return "ivfflat" if n_items <= config.ivf_flat_max_items else "hnsw"


def _factory(kind: str, n: int, d: int, config: IndexConfig) -> tuple[str, dict[str, Any]]:
    if kind == "flat":
        return "IDMap2,Flat", {}
    if kind == "hnsw":
        return f"IDMap2,HNSW{config.hnsw_m}", {
            "hnsw_m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction, "ef_search": config.hnsw_ef_search}
    if kind == "ivfflat":
        nlist = _nlist(n, config)
        return f"IVF{nlist},Flat", {"nlist": nlist, "nprobe": min(config.nprobe, nlist)}
    if kind == "ivfpq":
        if d % config.pq_m:
            raise IndexBuildError(f"pq_m={config.pq_m} must divide the embedding dim {d}")
        nlist = _nlist(n, config)
        params = {"nlist": nlist, "pq_m": config.pq_m, "pq_nbits": config.pq_nbits,
                  "nprobe": min(config.nprobe, nlist), "refine": config.refine}
        base = f"IVF{nlist},PQ{config.pq_m}x{config.pq_nbits}"
        if config.refine == "none":
            return base, params
        params["refine_k_factor"] = config.refine_k_factor
        return f"IDMap2,{base},{'Refine(SQ8)' if config.refine == 'sq8' else 'RFlat'}", params
    raise IndexBuildError(f"unknown index kind {kind!r}; expected auto, flat, ivfflat, hnsw or ivfpq")


def _nlist(n: int, config: IndexConfig) -> int:
    """IVF lists: ``config.ivf_nlist`` or about 4 sqrt(n), at most n (k-means cannot make more centroids than points)."""
    return min(config.ivf_nlist or max(1, round(4 * math.sqrt(n))), n)


# FAISS k-means wants at least 39 training points per centroid (it warns and trains poorly below that)
MIN_TRAIN_PER_CENTROID = 39


def train_ivf(index: faiss.Index, vectors: np.ndarray, config: IndexConfig, params: dict[str, Any]) -> None:
    """Train an empty IVF-Flat or IVF-PQ ``index`` on a seeded sample of ``vectors``; record its size in ``params``.

    The quantizers are k-means: the coarse one has ``nlist`` centroids, each PQ codebook (IVF-PQ) ``2 ** pq_nbits``.
    The sample is ``config.train_sample`` vectors, or ``MIN_TRAIN_PER_CENTROID`` per centroid of the larger of the
    two when that needs more (4,000 lists at 1M items: 156,000), or all of them when there are fewer.
    ``build_index`` and the sharded build both train here, so their quantizers are identical.
    """
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    centroids = int(params["nlist"])
    if isinstance(ivf, faiss.IndexIVFPQ):
        # Polysemous training (on by default for PQ) serves Hamming-filtered search, which we do not use, and costs
        # tens of seconds even on a few thousand vectors.
        ivf.do_polysemous_training = False
        centroids = max(centroids, 2 ** int(params["pq_nbits"]))
    n = len(vectors)
    size = max(config.train_sample, MIN_TRAIN_PER_CENTROID * centroids)
    rng = np.random.default_rng(config.seed)
    sample = vectors if n <= size else vectors[np.sort(rng.choice(n, size, replace=False))]
    params["train_sample"] = len(sample)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def _hnsw(index: faiss.Index) -> Any:
    return faiss.downcast_index(index.index).hnsw  # index is the IDMap2 wrapper


def _apply_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    """Search-time knobs; FAISS serialises them too, but the sidecar is the record we trust and show."""
    if kind == "hnsw":
        _hnsw(index).efSearch = int(params["ef_search"])
    elif kind in ("ivfflat", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
        if params.get("refine", "none") != "none":
            faiss.downcast_index(index.index).k_factor = float(params["refine_k_factor"])


def deep_search_params(kind: str, params: dict[str, Any], n_items: int, k: int) -> Any:
    """FAISS search parameters for a search of depth ``k``, or None for the index's own.

    An IVF-Flat index's ``nprobe`` lists hold about ``nprobe * n_items / nlist`` vectors, and FAISS pads what they
    lack with -1: a deep search (k + |seen| for a user with hundreds of seen items, up to 2,048) could come back
    short. Such a search probes enough lists to hold twice ``k`` on average (at most all of them); ``search_index``
    widens it for a row whose lists were smaller than average. A function of the index and ``k`` alone, so a request
    gets the same answer in any batch.
    """
    if kind != "ivfflat":
        return None
    nlist, nprobe = int(params["nlist"]), int(params["nprobe"])
    needed = min(nlist, math.ceil(2 * k * nlist / max(n_items, 1)))
    return None if needed <= nprobe else faiss.SearchParametersIVF(nprobe=needed)


def search_index(index: faiss.Index, kind: str, params: dict[str, Any], n_items: int, q: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """q (b, d) float32 -> (scores (b, k), ids (b, k) int64; -1 only where the index holds fewer than k items).

    What ``IndexArtifact.search`` and a loaded release search with: ``deep_search_params``, and then, for IVF-Flat,
    each row whose probed lists still held fewer than min(k, n_items) items (k-means lists differ in size: the
    lists nearest a query can be the small ones) searched again with twice the lists, up to all of them. A row's
    answer depends on its own query and ``k`` alone, never on the rest of the batch.
    """
    deep = deep_search_params(kind, params, n_items, k)
    scores, ids = index.search(q, k) if deep is None else index.search(q, k, params=deep)
    if kind != "ivfflat":
        return scores, ids
    nlist = int(params["nlist"])
    nprobe = int(deep.nprobe) if deep is not None else int(params["nprobe"])
    want = min(k, n_items)
    short = np.flatnonzero((ids[:, :want] < 0).any(axis=1))
    while len(short) and nprobe < nlist:
        nprobe = min(nlist, 2 * nprobe)
        s, i = index.search(np.ascontiguousarray(q[short]), k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        scores[short], ids[short] = s, i
        short = short[(i[:, :want] < 0).any(axis=1)]
    return scores, ids


def build_index(emb: ItemEmbeddings, config: IndexConfig) -> IndexArtifact:
    """Index ``emb.vectors`` (n, d) under ``emb.item_ids`` (n,), with inner product, as ``config`` asks."""
    n, d = emb.n_items, emb.dim
    if n == 0:
        raise IndexBuildError("no item vectors to index")
    vectors = np.ascontiguousarray(emb.vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        bad = emb.item_ids[~np.isfinite(vectors).all(axis=1)]
        raise IndexBuildError(f"{len(bad)} item vectors are NaN/inf (first item id {int(bad[0])}); "
                              "an index of them would return garbage")
    ids = np.ascontiguousarray(emb.item_ids, dtype=np.int64)
    kind = choose_kind(n, config)
    factory, params = _factory(kind, n, d, config)

    t0 = time.perf_counter()
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        _hnsw(index).efConstruction = config.hnsw_ef_construction
    if kind in ("ivfflat", "ivfpq"):
        train_ivf(index, vectors, config, params)
    index.add_with_ids(vectors, ids)
    _apply_search_params(index, kind, params)
    build_seconds = time.perf_counter() - t0
    return IndexArtifact(index, emb.release_id, emb.model_version, kind, factory, params, n, d,
                         emb.content_sha256(), round(build_seconds, 4))


@dataclass
class IndexMeasurement:
    """ANN quality and speed of an index against exact search over the same vectors."""

    kind: str
    k: int
    n_queries: int
    recall_at_k: float
    build_seconds: float
    p50_ms: float
    p99_ms: float
    per_query_recall: list[float] = field(default_factory=list, repr=False)

    def as_metrics(self) -> dict[str, float]:
        return {f"index_recall@{self.k}": self.recall_at_k, "index_build_s": self.build_seconds,
                "index_p50_ms": self.p50_ms, "index_p99_ms": self.p99_ms}


def exact_search(emb: ItemEmbeddings, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k item ids (b, k) by inner product: the ground truth an ANN index is measured against."""
    flat = faiss.IndexFlatIP(emb.dim)
    flat.add(np.ascontiguousarray(emb.vectors, dtype=np.float32))
    _, pos = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.where(pos >= 0, emb.item_ids[np.maximum(pos, 0)], -1)


def measure(index: IndexArtifact, emb: ItemEmbeddings, queries: np.ndarray, k: int,
            latency_queries: int = 200) -> IndexMeasurement:
    """Recall@k of ``index`` vs exact search over ``emb`` for ``queries`` (q, d); single-query latency.

    Recall per query = |ANN top-k ∩ exact top-k| / min(k, n_items), averaged over queries.
    """
    if index.release_id != emb.release_id or index.embeddings_sha256 != emb.content_sha256():
        raise IndexBuildError(f"index of release {index.release_id} was not built from these embeddings "
                              f"(release {emb.release_id})")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) == 0:
        raise IndexBuildError("measure needs at least one query vector")
    truth = exact_search(emb, queries, k)
    _, got = index.search(queries, k)
    denom = min(k, emb.n_items)
    per_query = [len(set(g[g >= 0].tolist()) & set(t[t >= 0].tolist())) / denom for g, t in zip(got, truth, strict=True)]

    times = []
    for q in queries[:latency_queries]:
        t0 = time.perf_counter()
        index.index.search(q[None, :], k)
        times.append((time.perf_counter() - t0) * 1000)
    return IndexMeasurement(index.kind, k, len(queries), float(np.mean(per_query)), index.build_seconds,
                            float(np.percentile(times, 50)), float(np.percentile(times, 99)), per_query)
