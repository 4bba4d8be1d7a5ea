"""Item embedding and index building over a sharded catalog, spread over a Dask cluster by prefect-dask.

    embed_shard x N (workers) -> concat -> train_index (this process) -> add_index_shard x N (workers) -> merge

The flow's default task runner is Prefect's thread pool, so it runs anywhere; ``run_sharded`` (or
``sharded_embed_index.with_options(task_runner=DaskTaskRunner(...))``) runs the same flow on a local Dask cluster
of worker processes or on a running one (``address="tcp://scheduler:8786"``, a KubeCluster, ...), and
``sharded_embed_index_dask`` is that as a deployable flow with the scheduler address as a parameter. Embeddings and
index come out equal to ``embed_items`` + ``build_index`` in one process (tasks/sharded_index.py says why).
Workers read the model from ``model_dir``: a path every worker can see (a shared volume, or fsspec storage
mounted there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from towerflow.config import IndexConfig
from towerflow.tasks.build_index import IndexArtifact
from towerflow.tasks.embed_items import ItemEmbeddings

# Inputs are big arrays: hashing them for a cache key would cost more than the work.
_TASK = {"cache_policy": NO_CACHE}


@task(name="embed_shard", **_TASK)
def embed_shard(model_dir: str, item_index: np.ndarray, item_ids: np.ndarray, release_id: str, model_version: str,
                batch_size: int) -> ItemEmbeddings:
    """One shard of the catalog through the item tower: item_index (m,), item_ids (m,) -> (m, d) vectors."""
    from towerflow.models.two_tower import load_model
    from towerflow.tasks.embed_items import embed_items

    model = load_model(model_dir)  # eval mode: no dropout, so a shard's vectors do not depend on the shard
    return embed_items(model.item_vectors, item_index, item_ids, release_id, batch_size, model_version=model_version)


@task(name="train_index", **_TASK)
def train_index(emb: ItemEmbeddings, config: IndexConfig) -> tuple[np.ndarray, str, str, dict]:
    from towerflow.tasks.sharded_index import train_empty_index

    return train_empty_index(emb, config)


@task(name="add_index_shard", **_TASK)
def add_index_shard(empty_index: np.ndarray, part: ItemEmbeddings) -> np.ndarray:
    from towerflow.tasks.sharded_index import add_shard

    return add_shard(empty_index, part)


@task(name="build_index_whole", **_TASK)
def build_index_whole(emb: ItemEmbeddings, config: IndexConfig) -> IndexArtifact:
    """HNSW: one graph, built in one process from every vector (FAISS threads it internally)."""
    from towerflow.tasks.build_index import build_index

    return build_index(emb, config)


@dataclass
class ShardedBuild:
    embeddings: ItemEmbeddings
    index: IndexArtifact
    n_shards: int
    seconds: float


@flow(name="sharded-embed-index")
def sharded_embed_index(
    model_dir: str,
    vocab_path: str,
    release_id: str,
    index: IndexConfig = IndexConfig(),  # noqa: B008 - pydantic default shown in the Prefect UI
    n_shards: int = 2,
    model_version: str = "",
    batch_size: int = 8192,
    out_dir: str | None = None,
) -> ShardedBuild:
    """Embed every item of ``vocab_path``'s catalog with the model in ``model_dir`` in ``n_shards`` shards, index
    them, and (with ``out_dir``) save ``embeddings/`` and ``index/`` with their sidecars."""
    from towerflow.tasks.build_examples import Vocab
    from towerflow.tasks.build_index import choose_kind
    from towerflow.tasks.sharded_index import (
        MERGEABLE_KINDS,
        assemble_index,
        concat_embeddings,
        merge_shards,
        shard_bounds,
    )

    log = get_run_logger()
    t0 = time.perf_counter()
    vocab = Vocab.from_json(Path(vocab_path).read_text())
    item_index, item_ids = np.arange(1, vocab.n_items + 1), vocab.item_ids
    bounds = shard_bounds(vocab.n_items, n_shards)
    embedded = [embed_shard.submit(model_dir, item_index[a:b], item_ids[a:b], release_id, model_version, batch_size)
                for a, b in bounds]
    emb = concat_embeddings([f.result() for f in embedded])
    log.info(f"embedded {emb.n_items:,} items in {len(bounds)} shards ({time.perf_counter() - t0:.1f}s)")

    t1 = time.perf_counter()
    if choose_kind(emb.n_items, index) in MERGEABLE_KINDS:
        empty, kind, factory, params = train_index(emb, index)
        # shard futures go back to the workers that hold them: the vectors are not shipped out a second time
        added = [add_index_shard.submit(empty, f) for f in embedded]
        artifact = assemble_index(merge_shards([f.result() for f in added]), emb, kind, factory, params,
                                  time.perf_counter() - t1)
    else:
        artifact = build_index_whole(emb, index)
    log.info(f"{artifact.kind} index of {artifact.n_items:,} items built in {artifact.build_seconds:.1f}s")
    if out_dir:
        emb.save(Path(out_dir) / "embeddings")
        artifact.save(Path(out_dir) / "index")
    return ShardedBuild(emb, artifact, len(bounds), time.perf_counter() - t0)


def dask_task_runner(address: str | None = None, n_workers: int = 2, **cluster_kwargs: Any):
    """A DaskTaskRunner on the scheduler at ``address``, or on a new local cluster of ``n_workers`` processes with
    one thread each (torch and FAISS in a worker then use one core: Dask's nanny sets OMP_NUM_THREADS=1)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    kwargs = {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=kwargs | cluster_kwargs)


def run_sharded(model_dir: str, vocab_path: str, release_id: str, *, address: str | None = None,
                n_workers: int = 2, **params: Any) -> ShardedBuild:
    """``sharded_embed_index`` on Dask; ``n_shards`` defaults to the number of workers."""
    params.setdefault("n_shards", n_workers)
    runner = dask_task_runner(address, n_workers)
    return sharded_embed_index.with_options(task_runner=runner)(model_dir, vocab_path, release_id, **params)


@flow(name="sharded-embed-index-dask")
def sharded_embed_index_dask(
    model_dir: str,
    vocab_path: str,
    release_id: str,
    dask_address: str | None = None,
    n_workers: int = 2,
    index: IndexConfig = IndexConfig(),  # noqa: B008 - pydantic default shown in the Prefect UI
    n_shards: int | None = None,
    model_version: str = "",
    batch_size: int = 8192,
    out_dir: str | None = None,
) -> ShardedBuild:
    """Deployable entry point: ``sharded_embed_index`` as a subflow on the Dask scheduler at ``dask_address``
    (e.g. ``tcp://dask-scheduler.dask:8786``), or on a local cluster of ``n_workers`` processes when it is None."""
    return run_sharded(model_dir, vocab_path, release_id, address=dask_address, n_workers=n_workers, index=index,
                       n_shards=n_shards or n_workers, model_version=model_version, batch_size=batch_size,
                       out_dir=out_dir)
