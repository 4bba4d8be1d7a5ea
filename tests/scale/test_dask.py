"""Sharded item embedding and index building (tasks/sharded_index.py, flows/sharded_index.py): the shards give
the same embeddings and the same index, byte for byte, as one process; the flow runs on a local 2-process Dask
cluster through prefect-dask."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from towerflow.config import IndexConfig, ModelConfig
from towerflow.models.batch import FeatureSizes, ItemFeatures
from towerflow.models.two_tower import TwoTower, load_model, save_model
from towerflow.tasks.build_examples import Vocab
from towerflow.tasks.build_index import IndexArtifact, IndexBuildError, build_index, file_sha256
from towerflow.tasks.embed_items import EmbeddingError, ItemEmbeddings, embed_items
from towerflow.tasks.sharded_index import (
    build_index_sharded,
    concat_embeddings,
    shard_bounds,
    train_empty_index,
)

N_ITEMS = 3_000
RELEASE = "r-20260101T000000-abcdef"
# Small quantizers train in a fraction of a second: 32 lists, 8 sub-quantizers of 64 centroids.
SMALL_IVFPQ = {"ivf_nlist": 32, "pq_m": 8, "pq_nbits": 6, "nprobe": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shard_bounds_are_contiguous_and_balanced():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]  # never an empty shard
    with pytest.raises(EmbeddingError, match="n_shards >= 1"):
        shard_bounds(10, 0)


def _emb(ids, vectors, release=RELEASE, version="m1") -> ItemEmbeddings:
    return ItemEmbeddings(release, np.asarray(ids, dtype=np.int64), np.asarray(vectors, dtype=np.float32), version)


def test_concat_embeddings_keeps_order_and_refuses_mixed_shards():
    a, b = _emb([5, 7], [[1, 0], [0, 1]]), _emb([9], [[0.6, 0.8]])
    both = concat_embeddings([a, b])
    assert both.item_ids.tolist() == [5, 7, 9]
    np.testing.assert_allclose(both.vectors, [[1, 0], [0, 1], [0.6, 0.8]], rtol=1e-6)
    assert (both.release_id, both.model_version) == (RELEASE, "m1")
    with pytest.raises(EmbeddingError, match="shard 1 is release other"):
        concat_embeddings([a, _emb([9], [[0.6, 0.8]], release="other")])
    with pytest.raises(EmbeddingError, match="overlap"):
        concat_embeddings([a, _emb([7], [[0.6, 0.8]])])


def _clustered(n: int, d: int = 32, seed: int = 0) -> ItemEmbeddings:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return _emb(np.arange(n) * 3 + 11, x)


@pytest.mark.parametrize("config", [
    IndexConfig(kind="flat"),
    IndexConfig(kind="ivfpq", refine="none", **SMALL_IVFPQ),
    IndexConfig(kind="ivfpq", refine="sq8", **SMALL_IVFPQ),  # the default re-ranked IVF-PQ
    IndexConfig(kind="ivfpq", refine="flat", **SMALL_IVFPQ),
], ids=["flat", "ivfpq", "ivfpq-sq8", "ivfpq-rflat"])
def test_index_from_shards_is_byte_identical_to_one_process(config: IndexConfig, tmp_path: Path):
    emb = _clustered(4_000)
    whole = build_index(emb, config).save(tmp_path / "whole")
    sharded = build_index_sharded(emb, config, n_shards=3).save(tmp_path / "sharded")
    assert file_sha256(sharded / "index.faiss") == file_sha256(whole / "index.faiss")
    loaded = IndexArtifact.load(sharded)  # what serving reads: the sidecar's search parameters applied
    assert (loaded.kind, loaded.n_items, loaded.params) == (config.kind, 4_000, IndexArtifact.load(whole).params)
    queries = emb.vectors[:20] + 0.01
    assert np.array_equal(loaded.search(queries, 10)[1], IndexArtifact.load(whole).search(queries, 10)[1])


def test_hnsw_cannot_be_assembled_from_shards():
    with pytest.raises(IndexBuildError, match="hnsw index cannot be assembled"):
        train_empty_index(_clustered(100), IndexConfig(kind="hnsw"))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A saved (untrained) two-tower model and the vocab.json of its 3,000-item catalog."""
    root = tmp_path_factory.mktemp("catalog")
    rng = np.random.default_rng(0)
    sizes = FeatureSizes(n_items=N_ITEMS, n_categories=6, n_genres=9, dense_dim=4, demographic_cardinalities=(3,))
    feats = ItemFeatures(category=torch.from_numpy(rng.integers(0, 7, N_ITEMS + 1)),
                         genres=torch.from_numpy(rng.integers(0, 10, (N_ITEMS + 1, 2))),
                         dense=torch.from_numpy(rng.standard_normal((N_ITEMS + 1, 4)).astype(np.float32)))
    torch.manual_seed(0)
    model = TwoTower(sizes, feats, ModelConfig(dim=32, d_model=32, hidden=64, n_layers=1))
    save_model(model, root / "model")
    vocab = Vocab(item_ids=np.arange(N_ITEMS) * 7 + 1_000, user_ids=np.array([1]),
                  categories=[f"c{i}" for i in range(6)], genres=[f"g{i}" for i in range(9)],
                  demographic_fields=["country"], demographic_values=[["fr", "jp", "us"]])
    (root / "vocab.json").write_text(vocab.to_json())
    return str(root / "model"), str(root / "vocab.json")


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_harness")
def test_flow_on_a_two_process_dask_cluster_equals_one_process(catalog: tuple[str, str], tmp_path: Path):
    from towerflow.flows.sharded_index import sharded_embed_index_dask

    model_dir, vocab_path = catalog
    config = IndexConfig(kind="ivfpq", **SMALL_IVFPQ)
    vocab = Vocab.from_json(Path(vocab_path).read_text())
    single_emb = embed_items(load_model(model_dir).item_vectors, np.arange(1, N_ITEMS + 1), vocab.item_ids, RELEASE,
                             model_version="m1")
    single_index = build_index(single_emb, config).save(tmp_path / "single")

    # the deployable flow: the sharded build as a subflow on a new local cluster of 2 worker processes
    out = sharded_embed_index_dask(model_dir, vocab_path, RELEASE, n_workers=2, n_shards=3, index=config,
                                   model_version="m1", out_dir=str(tmp_path / "sharded"))

    assert out.n_shards == 3
    assert np.array_equal(out.embeddings.item_ids, vocab.item_ids)
    np.testing.assert_allclose(out.embeddings.vectors, single_emb.vectors, rtol=0, atol=1e-6)
    saved = ItemEmbeddings.load(tmp_path / "sharded" / "embeddings")  # verified against its content hash
    assert saved.release_id == RELEASE and saved.n_items == N_ITEMS
    index = IndexArtifact.load(tmp_path / "sharded" / "index")
    assert index.embeddings_sha256 == out.embeddings.content_sha256()
    queries = single_emb.vectors[::100] + 0.01  # 30 queries
    got = index.search(queries, 10)[1]
    want = IndexArtifact.load(single_index).search(queries, 10)[1]
    if np.array_equal(out.embeddings.vectors, single_emb.vectors):  # bit-equal embeddings -> bit-equal index
        assert index.index_sha256 == IndexArtifact.load(single_index).index_sha256
    assert np.array_equal(got, want)
    assert faiss.extract_index_ivf(index.index).nprobe == 8


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_harness")
def test_same_flow_runs_on_the_default_thread_pool_and_builds_hnsw_whole(catalog: tuple[str, str]):
    from towerflow.flows.sharded_index import sharded_embed_index

    model_dir, vocab_path = catalog
    vocab = Vocab.from_json(Path(vocab_path).read_text())
    single = embed_items(load_model(model_dir).item_vectors, np.arange(1, N_ITEMS + 1), vocab.item_ids, RELEASE)

    out = sharded_embed_index(model_dir, vocab_path, RELEASE, index=IndexConfig(kind="hnsw"), n_shards=4)

    assert out.n_shards == 4
    np.testing.assert_allclose(out.embeddings.vectors, single.vectors, rtol=0, atol=1e-6)
    assert (out.index.kind, out.index.n_items, out.index.factory) == ("hnsw", N_ITEMS, "IDMap2,HNSW32")
    # every item is its own nearest neighbour, returned under its own id
    _, ids = out.index.search(single.vectors[:50], 1)
    assert ids[:, 0].tolist() == vocab.item_ids[:50].tolist()
