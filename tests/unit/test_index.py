"""Item embedding and the FAISS index: batching, id mapping, recall against exact search, sidecar round trip."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch

from towerflow.config import GateConfig, IndexConfig
from towerflow.tasks.build_index import (
    IndexArtifact,
    IndexBuildError,
    build_index,
    choose_kind,
    exact_search,
    measure,
)
from towerflow.tasks.embed_items import EmbeddingError, ItemEmbeddings, embed_items

RID = "r-20260101T000000-abcdef"


def clustered(n: int, d: int, n_clusters: int, seed: int, noise: float = 0.5) -> np.ndarray:
    """Unit vectors around random cluster centres: the shape item embeddings of a trained model have."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    x = centres[rng.integers(0, n_clusters, n)] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> ItemEmbeddings:
    """3000 clustered items in 32 dims with ids 10_000, 10_007, ... (never positions)."""
    vectors = clustered(3000, 32, 30, seed=0)
    return ItemEmbeddings(RID, 10_000 + 7 * np.arange(3000, dtype=np.int64), vectors, "model-1")


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(200, 32, 30, seed=1, noise=0.7)


def test_embed_items_batches_into_one_matrix_without_grad():
    table = torch.nn.Embedding(11, 2)  # a real item tower stand-in: row i = (i, 2i)
    with torch.no_grad():
        table.weight.copy_(torch.stack([torch.arange(11.0), 2 * torch.arange(11.0)], dim=1))
    seen: list[int] = []

    def encode(idx: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        seen.append(len(idx))
        return table(idx)

    item_index = np.arange(1, 11)  # vocabulary rows 1..10 (0 is padding)
    item_ids = np.arange(1, 11) * 100  # real ids 100..1000
    emb = embed_items(encode, item_index, item_ids, RID, batch_size=4, model_version="m")
    assert seen == [4, 4, 2]  # 10 items in batches of 4
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (10, 2)
    assert emb.item_ids.dtype == np.int64 and emb.item_ids.tolist() == list(range(100, 1001, 100))
    np.testing.assert_array_equal(emb.vectors[2], [3.0, 6.0])  # item index 3 -> (3, 6)
    np.testing.assert_array_equal(emb.vectors[9], [10.0, 20.0])
    assert (emb.release_id, emb.model_version) == (RID, "m")
    assert not table.weight.grad  # nothing was traced


def test_embed_items_rejects_bad_input():
    def encode(idx):
        return torch.zeros(len(idx), 3)

    with pytest.raises(EmbeddingError, match="duplicates"):
        embed_items(encode, np.arange(3), np.array([5, 5, 6]), RID)
    with pytest.raises(EmbeddingError, match="empty"):
        embed_items(encode, np.arange(0), np.arange(0), RID)
    with pytest.raises(EmbeddingError, match=r"expected \(batch, dim\)"):
        embed_items(lambda idx: torch.zeros(len(idx)), np.arange(3), np.arange(3), RID)


def test_embeddings_save_load_round_trip_and_refuse_changed_files(tmp_path, catalog):
    catalog.save(tmp_path)
    meta = json.loads((tmp_path / "item_embeddings.json").read_text())
    assert meta["release_id"] == RID and (meta["n_items"], meta["dim"]) == (3000, 32)
    back = ItemEmbeddings.load(tmp_path, mmap=True)
    np.testing.assert_array_equal(back.vectors, catalog.vectors)
    assert back.content_sha256() == catalog.content_sha256()
    changed = catalog.vectors.copy()
    changed[5, 0] += 1e-3
    np.save(tmp_path / "item_embeddings.npy", changed)
    with pytest.raises(EmbeddingError, match="content hash"):
        ItemEmbeddings.load(tmp_path)


def test_flat_index_scores_by_inner_product_and_answers_real_ids():
    # Worked by hand: query (1, 0) scores 1.0, 0.6, 0.0, -1.0 against the four items below.
    vectors = np.array([[0, 1], [1, 0], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    emb = ItemEmbeddings(RID, np.array([501, 502, 503, 504]), vectors)
    art = build_index(emb, IndexConfig())
    assert art.kind == "flat" and art.factory == "IDMap2,Flat"
    scores, ids = art.search(np.array([[1.0, 0.0]]), 4)
    assert ids.tolist() == [[502, 504, 501, 503]]
    np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0, -1.0]], atol=1e-6)
    _, ids = art.search(np.array([[1.0, 0.0]]), 6)  # more than the catalog: padded with -1
    assert ids[0, 4:].tolist() == [-1, -1]


def test_auto_picks_flat_then_ivfflat_then_hnsw_and_checks_pq_shape():
    config = IndexConfig(flat_max_items=1000, ivf_flat_max_items=2000)
    assert [choose_kind(n, config) for n in (1000, 1001, 2000, 2001)] == ["flat", "ivfflat", "ivfflat", "hnsw"]
    assert choose_kind(1_000_000, IndexConfig()) == "ivfflat"  # the defaults: Flat to 50k, IVF-Flat to 1M
    assert choose_kind(1_000_001, IndexConfig()) == "hnsw"
    assert choose_kind(10, IndexConfig(kind="ivfpq")) == "ivfpq"
    emb = ItemEmbeddings(RID, np.arange(300), clustered(300, 30, 5, seed=2))
    with pytest.raises(IndexBuildError, match="pq_m=16 must divide the embedding dim 30"):
        build_index(emb, IndexConfig(kind="ivfpq"))
    bad = emb.vectors.copy()
    bad[7, 3] = np.nan
    with pytest.raises(IndexBuildError, match="first item id 7"):
        build_index(ItemEmbeddings(RID, np.arange(300), bad), IndexConfig())


def test_flat_recall_is_exactly_one(catalog, queries):
    art = build_index(catalog, IndexConfig())
    m = measure(art, catalog, queries, k=50)
    assert m.kind == "flat" and m.recall_at_k == 1.0
    assert 0 < m.p50_ms <= m.p99_ms and m.n_queries == 200


@pytest.mark.parametrize(
    ("config", "factory", "k", "min_recall"),
    [
        (IndexConfig(kind="hnsw"), "IDMap2,HNSW32", 10, GateConfig().min_index_recall),
        (IndexConfig(flat_max_items=1000), "IVF219,Flat", 10, GateConfig().min_index_recall),
        (IndexConfig(kind="ivfpq", pq_m=8), "IDMap2,IVF219,PQ8x8,Refine(SQ8)", 10, GateConfig().min_index_recall),
        # PQ codes alone (no re-ranking) lose precision: a lower bar, but ids must still be mapped.
        (IndexConfig(kind="ivfpq", pq_m=16, pq_nbits=4, refine="none", ivf_nlist=64, nprobe=16),
         "IVF64,PQ16x4", 50, 0.70),
    ],
    ids=["hnsw", "ivfflat", "ivfpq-refine", "ivfpq"],
)
def test_ann_reaches_recall_with_real_ids(catalog, queries, config, factory, k, min_recall):
    art = build_index(catalog, config)
    assert art.factory == factory  # nlist = round(4 * sqrt(3000)) = 219 by default
    m = measure(art, catalog, queries, k=k)
    assert m.recall_at_k >= min_recall, m
    # ids are the catalog's ids, not positions: an item's own vector finds the item itself at the top
    _, ids = art.search(catalog.vectors[[0, 1234, 2999]], k)
    assert set(ids.ravel().tolist()) <= set(catalog.item_ids.tolist())
    # graph, exact scores in the item's own list, exact re-ranking: the item itself ranks first
    if art.kind in ("hnsw", "ivfflat") or "Refine" in art.factory:
        assert ids[:, 0].tolist() == [10_000, 10_000 + 7 * 1234, 10_000 + 7 * 2999]
    truth = exact_search(catalog, queries[:1], k)
    assert truth.min() >= 10_000


def test_ivfpq_trains_on_at_least_39_vectors_per_list(catalog):
    # 3,000 items: train_sample 100 is raised to 39 x 20 lists = 780; 39 x 100 lists = 3,900 > n takes them all
    small = build_index(catalog, IndexConfig(kind="ivfpq", pq_m=8, pq_nbits=4, ivf_nlist=20, train_sample=100))
    assert small.params["train_sample"] == 780
    many = build_index(catalog, IndexConfig(kind="ivfpq", pq_m=8, pq_nbits=4, ivf_nlist=100, train_sample=100))
    assert many.params["train_sample"] == 3000
    enough = build_index(catalog, IndexConfig(kind="ivfpq", pq_m=8, pq_nbits=4, ivf_nlist=20, train_sample=1000))
    assert enough.params["train_sample"] == 1000


def test_index_save_load_keeps_sidecar_params_and_refuses_changed_file(tmp_path, catalog, queries):
    art = build_index(catalog, IndexConfig(kind="hnsw", hnsw_ef_search=77))
    art.save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert {k: meta[k] for k in ("release_id", "model_version", "n_items", "dim", "kind")} == {
        "release_id": RID, "model_version": "model-1", "n_items": 3000, "dim": 32, "kind": "hnsw"}
    assert meta["params"] == {"hnsw_m": 32, "ef_construction": 80, "ef_search": 77}
    assert meta["embeddings_sha256"] == catalog.content_sha256() and len(meta["index_sha256"]) == 64
    assert meta["metric"] == "inner_product" and meta["build_seconds"] > 0
    back = IndexArtifact.load(tmp_path)
    assert np.array_equal(back.search(queries, 10)[1], art.search(queries, 10)[1])
    assert faiss.downcast_index(back.index.index).hnsw.efSearch == 77
    raw = bytearray((tmp_path / "index.faiss").read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(IndexBuildError, match="does not match the sha256"):
        IndexArtifact.load(tmp_path)


def test_ivfflat_searches_nprobe_lists_with_exact_scores_and_keeps_nprobe_on_load(tmp_path):
    # Two clusters of 40 items in 2-d: A_i = (1, i/100) and B_i = (i/100, 1), normalised, ids 100 + i and 200 + i.
    # k-means with 2 lists puts each cluster in its own list; query (1, 0) scores A_i = 1 / sqrt(1 + (i/100)^2),
    # highest for A_0, A_1, A_2, ..., and B_i = (i/100) / sqrt(1 + (i/100)^2), below every A item, highest for B_39.
    steps = np.arange(40) / 100
    a = np.stack([np.ones(40), steps], axis=1)
    b = np.stack([steps, np.ones(40)], axis=1)
    vectors = np.concatenate([a, b]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = ItemEmbeddings(RID, np.concatenate([100 + np.arange(40), 200 + np.arange(40)]), vectors)
    art = build_index(emb, IndexConfig(kind="ivfflat", ivf_nlist=2, nprobe=1))
    assert (art.factory, art.params) == ("IVF2,Flat", {"nlist": 2, "nprobe": 1, "train_sample": 80})
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    scores, ids = art.search(query, 10)
    assert ids[0].tolist() == list(range(100, 110))
    np.testing.assert_allclose(scores[0, :3], 1 / np.sqrt(1 + np.array([0.0, 1e-4, 4e-4])), rtol=1e-6)
    # nprobe 1 at depth 50: the one list holds A's 40 items, then FAISS's "no result"
    _, raw = art.index.search(query, 50)
    assert sorted(raw[0, :40].tolist()) == list(range(100, 140)) and raw[0, 40:].tolist() == [-1] * 10
    # a deep search probes ceil(2 * 50 * 2 lists / 80 items) = 3, at most the 2 lists there are: B's best follow A
    _, deep = art.search(query, 50)
    assert deep[0, :40].tolist() == raw[0, :40].tolist() and deep[0, 40:].tolist() == list(range(239, 229, -1))
    art.save(tmp_path)
    assert faiss.extract_index_ivf(IndexArtifact.load(tmp_path).index).nprobe == 1
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["params"]["nprobe"] = 2  # the sidecar's nprobe is what a loaded index searches with
    (tmp_path / "index.json").write_text(json.dumps(meta))
    assert faiss.extract_index_ivf(IndexArtifact.load(tmp_path).index).nprobe == 2


def uneven_ivf(nprobe: int = 1) -> IndexArtifact:
    """An IVF-Flat index over 4 lists of uneven size, its centroids set by hand (the 4 axes of 4-d space): list e1
    holds A_j = e1 + j/1000 e2 (370 items, ids 1000 + j), lists e2, e3, e4 hold B_i = e2 + i/100 e1 (ids 2000 + i),
    C_i = e3 + i/100 e4 and D_i = e4 + i/100 e3 (10 items each), all normalised."""
    e = np.eye(4, dtype=np.float32)
    j, i = np.arange(370)[:, None] / 1000, np.arange(10)[:, None] / 100
    vectors = np.concatenate([e[0] + j * e[1], e[1] + i * e[0], e[2] + i * e[3], e[3] + i * e[2]]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.concatenate([1000 + np.arange(370), 2000 + np.arange(10), 3000 + np.arange(10), 4000 + np.arange(10)])
    index = faiss.index_factory(4, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(e)
    ivf.is_trained = True
    index.add_with_ids(vectors, ids.astype(np.int64))
    ivf.nprobe = nprobe
    return IndexArtifact(index, RID, "", "ivfflat", "IVF4,Flat", {"nlist": 4, "nprobe": nprobe}, 400, 4, "", 0.0)


def test_an_ivfflat_search_whose_nearest_lists_are_small_still_answers_k_items():
    art = uneven_ivf()
    # q = e2 + e1 / 10: nearest centroid e2 (list B, 10 items), then e1 (list A); depth 16 over 400 items in 4 lists
    # asks ceil(2 * 16 * 4 / 400) = 1 list, which holds 10: FAISS pads with -1
    q = np.array([[0.1, 1.0, 0.0, 0.0]], dtype=np.float32)
    _, raw = art.index.search(q, 16)
    assert sorted(raw[0, :10].tolist()) == list(range(2000, 2010)) and raw[0, 10:].tolist() == [-1] * 6
    # searched again with 2 lists (B, then A): B's 10 items, then A's best for q, A_369 .. A_364 (q.A_j grows with j)
    scores, ids = art.search(q, 16)
    assert sorted(ids[0, :10].tolist()) == list(range(2000, 2010))
    assert ids[0, 10:].tolist() == [1369, 1368, 1367, 1366, 1365, 1364]
    # a row of the batch that was whole keeps its nprobe-1 answer; each row answers as it does alone
    both = np.vstack([q, [[1.0, 0.0, 0.0, 0.0]]]).astype(np.float32)
    s2, i2 = art.search(both, 16)
    assert i2[0].tolist() == ids[0].tolist() and np.allclose(s2[0], scores[0])
    assert i2[1].tolist() == art.index.search(both[1:], 16)[1][0].tolist() == list(range(1000, 1016))
    # q = e3: list C (10 items), then 2 lists (C and one of the others), never short again
    _, i3 = art.search(np.array([[0.0, 0.0, 1.0, 0.0]], dtype=np.float32), 16)
    assert (i3 >= 0).all() and set(range(3000, 3010)) <= set(i3[0].tolist())
    # a catalog smaller than k: -1 only beyond its 400 items, after every list was searched
    _, all_ids = art.search(q, 410)
    assert sorted(all_ids[0, :400].tolist()) == sorted(
        [*range(1000, 1370), *range(2000, 2010), *range(3000, 3010), *range(4000, 4010)])
    assert all_ids[0, 400:].tolist() == [-1] * 10


def test_measure_refuses_embeddings_of_another_release(catalog, queries):
    art = build_index(catalog, IndexConfig())
    other = ItemEmbeddings("r-20260102T000000-000000", catalog.item_ids, catalog.vectors)
    with pytest.raises(IndexBuildError, match="not built from these embeddings"):
        measure(art, other, queries, 10)
