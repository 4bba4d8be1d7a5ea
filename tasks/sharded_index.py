"""Item embeddings and a FAISS index built shard by shard, equal to what one process builds (pure: no Prefect).

The catalog is cut into contiguous shards. Each shard is embedded on its own (any worker); the shards are
concatenated in order. The index is then built in three steps so that the expensive one runs on the workers:

1. ``train_empty_index`` (one process): the same factory, training sample and seed as ``tasks.build_index``, on
   the concatenated vectors -> an empty trained index (IVF centroids, PQ codebooks, SQ8 ranges).
2. ``add_shard`` (each worker): a copy of it with one shard's vectors added under their item ids (for IVF-PQ:
   assigning every vector to its list and encoding it, the part that grows with the catalog).
3. ``merge_shards`` (one process): append the shards in order.

Because shards are contiguous, appended in order and encoded with the same trained quantizers, the merged index
is byte for byte the index ``build_index`` writes for the whole catalog. HNSW's graph is built by inserting one
vector after another into one structure, so it cannot be assembled from parts: it is built in one process.
Indexes cross process boundaries as ``faiss.serialize_index`` byte arrays (SWIG objects do not pickle).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import faiss
import numpy as np

from towerflow.config import IndexConfig

# build_index's own factory and search-parameter helpers: a shard-built index must be configured exactly alike
from towerflow.tasks.build_index import (
    IndexArtifact,
    IndexBuildError,
    _apply_search_params,
    _factory,
    choose_kind,
    train_ivf,
)
from towerflow.tasks.embed_items import EmbeddingError, ItemEmbeddings

MERGEABLE_KINDS = ("flat", "ivfpq")


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``min(n_shards, n)`` contiguous ``[start, end)`` ranges whose sizes differ by at most 1.

    >>> shard_bounds(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    """
    if n < 1 or n_shards < 1:
        raise EmbeddingError(f"need n >= 1 items and n_shards >= 1, got n={n}, n_shards={n_shards}")
    edges = np.linspace(0, n, min(n_shards, n) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def concat_embeddings(parts: Sequence[ItemEmbeddings]) -> ItemEmbeddings:
    """Shards (in catalog order) -> one ItemEmbeddings; they must share release, model version and dim."""
    if not parts:
        raise EmbeddingError("no embedding shards to concatenate")
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        if (p.release_id, p.model_version, p.dim) != (first.release_id, first.model_version, first.dim):
            raise EmbeddingError(f"shard {i} is release {p.release_id} / model {p.model_version!r} / dim {p.dim}, "
                                 f"shard 0 is {first.release_id} / {first.model_version!r} / dim {first.dim}")
    ids = np.concatenate([p.item_ids for p in parts])
    if len(np.unique(ids)) != len(ids):
        raise EmbeddingError("embedding shards overlap: an item id appears in more than one shard")
    return ItemEmbeddings(first.release_id, ids, np.concatenate([p.vectors for p in parts]), first.model_version)


def train_empty_index(emb: ItemEmbeddings, config: IndexConfig) -> tuple[np.ndarray, str, str, dict]:
    """The trained, empty index that ``build_index(emb, config)`` would fill -> (serialized index, kind, factory,
    params). Only flat and ivfpq (see the module docstring); the sample and seed are build_index's own."""
    n, d = emb.n_items, emb.dim
    kind = choose_kind(n, config)
    if kind not in MERGEABLE_KINDS:
        raise IndexBuildError(f"a {kind} index cannot be assembled from shards; build it with build_index")
    factory, params = _factory(kind, n, d, config)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivfpq":
        train_ivf(index, emb.vectors, config, params)
    return faiss.serialize_index(index), kind, factory, params


def add_shard(empty_index: np.ndarray, part: ItemEmbeddings) -> np.ndarray:
    """A copy of the serialized trained index with ``part``'s vectors (m, d) added under its item ids (m,)."""
    vectors = np.ascontiguousarray(part.vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise IndexBuildError(f"an embedding shard has NaN/inf vectors (first item id "
                              f"{int(part.item_ids[~np.isfinite(vectors).all(axis=1)][0])})")
    index = faiss.deserialize_index(empty_index)
    index.add_with_ids(vectors, np.ascontiguousarray(part.item_ids, dtype=np.int64))
    return faiss.serialize_index(index)


def _merge_into(dst_index: faiss.Index, src_index: faiss.Index) -> None:
    """Append ``src_index``'s vectors to ``dst_index``. FAISS merges IDMap2(Flat) and IVF itself; IndexRefine (the
    re-ranked IVF-PQ, ``IDMap2,IVF..,PQ..,Refine(..)``) has no merge_from, so its parts are merged one by one.

    The caller must hold both arguments: a downcast proxy does not own its C++ object, and freeing the owning
    proxy mid-merge crashes the process.
    """
    dst, src = faiss.downcast_index(dst_index), faiss.downcast_index(src_index)
    inner = faiss.downcast_index(dst.index) if isinstance(dst, faiss.IndexIDMap2) else None
    if not isinstance(inner, faiss.IndexRefine):
        dst.merge_from(src, 0)
        return
    src_inner = faiss.downcast_index(src.index)
    offset = inner.ntotal  # the refine stage numbers vectors 0..n-1; the IDMap2 maps them to item ids
    faiss.downcast_index(inner.base_index).merge_from(faiss.downcast_index(src_inner.base_index), offset)
    faiss.downcast_index(inner.refine_index).merge_from(faiss.downcast_index(src_inner.refine_index), 0)
    inner.ntotal = inner.base_index.ntotal
    ids = np.concatenate([faiss.vector_to_array(dst.id_map), faiss.vector_to_array(src.id_map)])
    faiss.copy_array_to_vector(ids, dst.id_map)
    dst.ntotal = inner.ntotal
    dst.construct_rev_map()


def merge_shards(shards: Sequence[np.ndarray]) -> faiss.Index:
    """Serialized shard indexes (in catalog order) -> one index holding all their vectors, in that order."""
    if not shards:
        raise IndexBuildError("no index shards to merge")
    merged = faiss.deserialize_index(shards[0])
    for blob in shards[1:]:
        part = faiss.deserialize_index(blob)  # held here until the merge is done (see _merge_into)
        _merge_into(merged, part)
        del part
    return merged


def assemble_index(merged: faiss.Index, emb: ItemEmbeddings, kind: str, factory: str, params: dict,
                   build_seconds: float) -> IndexArtifact:
    """Wrap a merged index as the IndexArtifact ``build_index`` would return for ``emb``."""
    if merged.ntotal != emb.n_items or merged.d != emb.dim:
        raise IndexBuildError(f"merged index holds {merged.ntotal}x{merged.d}, the embeddings {emb.n_items}x{emb.dim}")
    _apply_search_params(merged, kind, params)
    return IndexArtifact(merged, emb.release_id, emb.model_version, kind, factory, params, emb.n_items, emb.dim,
                         emb.content_sha256(), round(build_seconds, 4))


def build_index_sharded(emb: ItemEmbeddings, config: IndexConfig, n_shards: int) -> IndexArtifact:
    """The three steps above in this process (what the Dask flow spreads over workers); HNSW falls back to
    ``build_index``. Same index as ``build_index(emb, config)``."""
    from towerflow.tasks.build_index import build_index

    if choose_kind(emb.n_items, config) not in MERGEABLE_KINDS:
        return build_index(emb, config)
    t0 = time.perf_counter()
    empty, kind, factory, params = train_empty_index(emb, config)
    parts = [add_shard(empty, ItemEmbeddings(emb.release_id, emb.item_ids[a:b], emb.vectors[a:b], emb.model_version))
             for a, b in shard_bounds(emb.n_items, n_shards)]
    return assemble_index(merge_shards(parts), emb, kind, factory, params, time.perf_counter() - t0)

