"""Embed the whole catalog with the item tower, in batches, into one release-tagged matrix.

The output is the item side of a release: ``vectors[i]`` is the item tower's vector for ``item_ids[i]``. It is
tagged with the release id (and the id of the model that produced it) so that nothing downstream can pair it with
another release's user tower or index without noticing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from towerflow.errors import TowerflowError
from towerflow.progress import progress

VECTORS_FILE = "item_embeddings.npy"
IDS_FILE = "item_ids.npy"
META_FILE = "item_embeddings.json"


class EmbeddingError(TowerflowError):
    """The item tower's output or a saved embedding file is not what a release needs."""


@dataclass
class ItemEmbeddings:
    """Item vectors of one release.

    ``item_ids``: (n,) int64 real item ids (unique). ``vectors``: (n, d) float32, row i is ``item_ids[i]``.
    ``model_version`` names the model that produced them (e.g. its training run id); may be empty.
    """

    release_id: str
    item_ids: np.ndarray
    vectors: np.ndarray
    model_version: str = ""

    @property
    def n_items(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def content_sha256(self) -> str:
        """Hash of the ids and vectors themselves (not of a file format), so index and release can pin them."""
        h = hashlib.sha256()
        h.update(f"{self.n_items}x{self.dim}:".encode())
        h.update(np.ascontiguousarray(self.item_ids, dtype="<i8").data)
        # Hash row blocks: a contiguous copy of a memory-mapped matrix of millions of rows is not needed.
        for start in range(0, self.n_items, 65_536):
            h.update(np.ascontiguousarray(self.vectors[start : start + 65_536], dtype="<f4").data)
        return h.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write ``item_embeddings.npy``, ``item_ids.npy`` and the ``item_embeddings.json`` sidecar into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / VECTORS_FILE, np.ascontiguousarray(self.vectors, dtype=np.float32))
        np.save(directory / IDS_FILE, np.ascontiguousarray(self.item_ids, dtype=np.int64))
        meta = {
            "release_id": self.release_id,
            "model_version": self.model_version,
            "n_items": self.n_items,
            "dim": self.dim,
            "content_sha256": self.content_sha256(),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False, verify: bool = True) -> ItemEmbeddings:
        """Read what :meth:`save` wrote; with ``verify`` the content hash must match the sidecar's."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise EmbeddingError(f"{meta_path} is missing: not a saved set of item embeddings")
        meta = json.loads(meta_path.read_text())
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r" if mmap else None)
        item_ids = np.load(directory / IDS_FILE)
        emb = cls(meta["release_id"], item_ids, vectors, meta.get("model_version", ""))
        if vectors.ndim != 2 or item_ids.shape != (vectors.shape[0],):
            raise EmbeddingError(f"{directory}: ids {item_ids.shape} do not match vectors {vectors.shape}")
        if (emb.n_items, emb.dim) != (meta["n_items"], meta["dim"]):
            raise EmbeddingError(f"{meta_path} says {meta['n_items']}x{meta['dim']}, files hold "
                                 f"{emb.n_items}x{emb.dim}")
        if verify and emb.content_sha256() != meta["content_sha256"]:
            raise EmbeddingError(f"{directory}: embeddings do not match the content hash in {META_FILE}")
        return emb


def embed_items(
    encode: Callable[[torch.Tensor], torch.Tensor],
    item_index: np.ndarray,
    item_ids: np.ndarray,
    release_id: str,
    batch_size: int = 8192,
    *,
    model_version: str = "",
) -> ItemEmbeddings:
    """Run the item tower over the catalog in batches.

    ``encode``: (b,) long item indices -> (b, d) vectors (the item tower; it moves inputs to its own device).
    ``item_index``: (n,) vocabulary indices to encode; ``item_ids``: (n,) the real ids they stand for.
    Memory stays bounded: one preallocated (n, d) float32 output and one batch of activations at a time.
    """
    item_index = np.asarray(item_index)
    item_ids = np.asarray(item_ids)
    if item_index.ndim != 1 or item_ids.shape != item_index.shape:
        raise EmbeddingError(f"item_index {item_index.shape} and item_ids {item_ids.shape} must be equal 1-D arrays")
    if not (np.issubdtype(item_index.dtype, np.integer) and np.issubdtype(item_ids.dtype, np.integer)):
        raise EmbeddingError("item_index and item_ids must be integer arrays")
    n = len(item_ids)
    if n == 0:
        raise EmbeddingError("the catalog is empty: nothing to embed")
    if len(np.unique(item_ids)) != n:
        raise EmbeddingError("item_ids has duplicates: the index could not map results back to single items")
    if batch_size < 1:
        raise EmbeddingError(f"batch_size must be >= 1, got {batch_size}")

    out: np.ndarray | None = None
    starts = range(0, n, batch_size)
    with torch.no_grad():
        for start in progress(starts, total=len(starts), desc="embed items (batches)"):
            idx = torch.from_numpy(item_index[start : start + batch_size].astype(np.int64))
            vec = encode(idx)  # (b, d)
            if vec.ndim != 2 or vec.shape[0] != len(idx):
                raise EmbeddingError(f"encode returned shape {tuple(vec.shape)} for a batch of {len(idx)} items; "
                                     "expected (batch, dim)")
            if out is None:
                out = np.empty((n, vec.shape[1]), dtype=np.float32)
            elif vec.shape[1] != out.shape[1]:
                raise EmbeddingError(f"encode changed its output dim from {out.shape[1]} to {vec.shape[1]}")
            out[start : start + len(idx)] = vec.detach().to("cpu", torch.float32).numpy()
    assert out is not None
    return ItemEmbeddings(release_id, item_ids.astype(np.int64), out, model_version)


def embed_new_items(item_tower: torch.nn.Module, vocab, items) -> np.ndarray:
    """Vectors of catalog rows a release's vocabulary does not hold, from their features alone (no id embedding).

    ``item_tower``: the release's ``ItemTower``; ``vocab``: its ``tasks.vocabulary.Vocab`` (category and genre
    codes are looked up there: a value it lacks is code 0, unknown); ``items``: (m,) rows in the contract's items
    columns plus an optional ``features`` list column (null rows, or no column, are zeros as in training).
    Returns (m, dim) float32, row i for ``items.iloc[i]``: what the tower gives an item past its id table.
    """
    from towerflow.tasks.vocabulary import Vocab, item_features

    ids = items["item_id"].to_numpy(dtype=np.int64)
    if len(ids) == 0:
        return np.zeros((0, item_tower.cfg.dim), dtype=np.float32)
    if len(np.unique(ids)) != len(ids):
        raise EmbeddingError("embed_new_items: item_ids has duplicates")
    order = np.argsort(ids, kind="stable")
    # a vocabulary of these items only, with the release's value lists: row i + 1 of the table is sorted id i
    own = Vocab(ids[order], np.zeros(0, dtype=np.int64), vocab.categories, vocab.genres, [], [])
    f = item_features(items, own, max_genres=int(item_tower.genres.shape[1]))
    dense_dim = item_tower.sizes.dense_dim
    dense = None
    if dense_dim:
        dense = f.dense[1:] if f.dense is not None else torch.zeros(len(ids), dense_dim)
        if dense.shape[1] != dense_dim:
            raise EmbeddingError(f"embed_new_items: features of length {dense.shape[1]}, the tower takes {dense_dim}")
    device = item_tower.category.device
    if item_tower.training:  # a served tower is in eval mode already; never flip a shared module's mode here
        raise EmbeddingError("embed_new_items: the item tower is in training mode (dropout); call .eval() first")
    with torch.inference_mode():
        vec = item_tower.embed_features(f.category[1:].to(device), f.genres[1:].to(device),
                                        None if dense is None else dense.float().to(device),
                                        text=f.text[1:].to(device))  # (m, dim)
    out = np.empty((len(ids), vec.shape[1]), dtype=np.float32)
    out[order] = vec.cpu().numpy()
    return out
