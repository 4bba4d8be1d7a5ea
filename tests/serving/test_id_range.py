"""No valid item id is lost between the FAISS index and a /retrieve answer (issue #14 item 4).

FAISS answers -1 for "no result" and ``serving.retrieval.search`` drops ids below 0, so a negative item id would
vanish (k=3 gave 2 items); importers and the data gate now refuse negative ids. Here every id the contract allows,
0 and the int64 extremes included, is indexed by the real ``build_index`` (exact and HNSW) and comes back through
``search``, the function ``/retrieve`` answers with.
"""

from __future__ import annotations

import numpy as np
import pytest

from towerflow.config import IndexConfig
from towerflow.infra.releases import LoadedRelease
from towerflow.serving.retrieval import search
from towerflow.tasks.build_index import build_index
from towerflow.tasks.embed_items import ItemEmbeddings

pytestmark = pytest.mark.usefixtures("one_thread")

EDGE_IDS = [0, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 2, 2**63 - 1]


def _release(kind: str) -> tuple[LoadedRelease, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.array(EDGE_IDS + sorted(rng.integers(2, 2**63 - 2, size=56).tolist()), dtype=np.int64)
    vectors = rng.normal(size=(len(ids), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = ItemEmbeddings("r-ids", ids, vectors)
    art = build_index(emb, IndexConfig(kind=kind))
    release = LoadedRelease(release_id="r-ids", manifest=None, index=art.index, item_ids=ids, item_vectors=vectors,
                            q_table=None, config={}, vocab_dir=None, model=None)
    return release, vectors


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_every_valid_id_comes_back_and_none_is_dropped(kind):
    release, vectors = _release(kind)
    ids = release.item_ids.tolist()
    answers = search(release, vectors, k=len(ids))  # each item's own vector: the whole catalog, itself first
    for i, a in enumerate(answers):
        got = [x["item_id"] for x in a["items"]]
        assert got[0] == ids[i]
        assert sorted(got) == sorted(ids)  # nothing dropped, nothing invented, ids exact to the last bit
    assert {type(x["item_id"]) for a in answers for x in a["items"]} == {int}


def test_asking_for_more_than_the_catalog_returns_the_catalog_not_padding():
    release, vectors = _release("flat")
    scores, raw = release.search(vectors[:1], 100)  # FAISS pads with -1 beyond the 64 items ...
    assert (raw[0] == -1).sum() == 36
    (answer,) = search(release, vectors[:1], k=100)  # ... and search asks only for what exists
    assert len(answer["items"]) == 64 and min(x["item_id"] for x in answer["items"]) == 0
    (three,) = search(release, vectors[:1], k=3, exclude=[{int(release.item_ids[0])}])
    assert len(three["items"]) == 3  # an excluded id is replaced, never leaves a hole
