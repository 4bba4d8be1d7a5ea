"""The traced context layer serving runs per batch (retrieval.trace_combine): the same u as the tower's eager
``combine`` for any batch, eager kept when tracing would change an answer, and the service answering with it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
import torch

from towerflow.config import ModelConfig
from towerflow.models.batch import FeatureSizes, ItemFeatures
from towerflow.models.query import encode_texts
from towerflow.models.two_tower import TwoTower
from towerflow.models.user_tower import UserTower
from towerflow.serving.batcher import MicroBatcher
from towerflow.serving.retrieval import trace_combine
from towerflow.serving.service import Query

SIZES = FeatureSizes(n_items=30, n_categories=4, n_genres=5, dense_dim=3, demographic_cardinalities=(3, 2))
SMALL = {"dim": 8, "d_model": 8, "n_heads": 2, "n_layers": 1, "hidden": 16, "max_seq_len": 8, "query_buckets": 64}

pytestmark = pytest.mark.usefixtures("one_thread")


def tower(**overrides) -> tuple[UserTower, torch.Tensor]:
    """A small model's user tower in eval mode and its item table (31, 8)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    feats = ItemFeatures(category=torch.randint(1, 5, (31,), generator=g), genres=torch.randint(0, 6, (31, 2), generator=g),
                         dense=torch.randn(31, 3, generator=g))
    model = TwoTower(SIZES, feats, ModelConfig(**{**SMALL, **overrides})).eval()
    return model.user_tower, model.all_item_vectors()


def requests(user_tower: UserTower, table: torch.Tensor, texts: list[str | None]) -> tuple:
    """combine's inputs for len(texts) requests: every other one with a viewed item, the surfaces in turn."""
    n = len(texts)
    g = torch.Generator().manual_seed(n)
    ctx = torch.tensor([i % 30 + 1 if i % 2 else 0 for i in range(n)])
    return (torch.randn(n, user_tower.history_dim, generator=g), ctx, torch.arange(n) % 3,
            torch.stack([torch.arange(n) % 4, torch.arange(n) % 3], 1), table[ctx],
            torch.from_numpy(encode_texts(texts)))


@pytest.mark.parametrize("overrides", [{}, {"use_query": False}, {"use_context": False, "history_residual": False}])
def test_the_traced_layer_gives_eager_combines_vectors_for_any_batch(overrides):
    user_tower, table = tower(**overrides)
    traced = trace_combine(user_tower, table)
    assert traced is not None
    with torch.inference_mode():
        # batch sizes and query widths the trace was not taken on; a batch without any query (width 1)
        for texts in ([None], ["red shoes", None, "a b c d e f g h i j", None, "x", None, "blue"], [None] * 9):
            x = requests(user_tower, table, texts)
            got, want = traced(*x), user_tower.combine(*x)
            assert got.shape == (len(texts), 8)
            assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert not user_tower.training  # left as it was


class BatchSizeBranch(UserTower):
    """A context layer whose answer depends on the batch size: a trace keeps the branch of the batch it saw."""

    def context_layer(self, h, *rest):
        u = super().context_layer(h, *rest)
        return u if h.shape[0] > 3 else -u


def test_a_layer_the_trace_would_change_is_served_eager():
    user_tower, table = tower()
    branchy = BatchSizeBranch(SIZES, user_tower.cfg, user_tower.item_tower).eval()
    assert trace_combine(branchy, table) is None


def test_the_service_answers_with_the_traced_layer_as_with_eager(hybrid):
    b = hybrid.bundle
    assert b.combine is not None and hybrid.status()["combine"] == "traced"
    users = [int(u) for u in b.profiles.user_ids[:6]]
    items = [int(i) for i in b.vocab.item_ids[[3, 50, 7]]]
    queries = [Query(users[0], None, "homefeed", 5), Query(users[1], items[0], "related", 7),
               Query(users[2], items[1], "search", 4, True, "kalo venmi"), Query(users[3], None, "search", 6, True, "x"),
               Query(users[4], items[2], "homefeed", 3), Query(users[5], None, "related", 8)]
    traced, eager = hybrid.retrieve_batch(queries), hybrid.retrieve_batch(queries, replace(b, combine=None))
    assert {o["path"] for o in traced} <= {"state", "online"}  # every request went through combine
    for t, e in zip(traced, eager, strict=True):
        assert [x["item_id"] for x in t["items"]] == [x["item_id"] for x in e["items"]]
        assert [x["score"] for x in t["items"]] == pytest.approx([x["score"] for x in e["items"]], abs=1e-6)


def test_each_worker_runs_the_initializer_before_its_first_batch():
    seen = threading.local()
    names = []

    def init():
        seen.name = threading.current_thread().name

    def answer(queries):
        names.append(getattr(seen, "name", None))
        return queries

    async def main():
        b = MicroBatcher(answer, initializer=init)
        await asyncio.gather(b.submit(1))
        await asyncio.gather(b.submit(2))
        b.close()

    asyncio.run(main())
    assert len(names) == 2 and all(n is not None and n.startswith("retrieve-batch") for n in names)
