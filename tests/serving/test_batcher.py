"""Micro-batching: requests gathered while the worker is busy, answered together with the answer each gets alone;
the depth a request searches and the excluded ids it drops, computed by hand."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from towerflow.serving.batcher import MicroBatcher
from towerflow.serving.retrieval import excluded, search_depth
from towerflow.serving.service import Query, RequestError


def test_requests_gather_while_the_worker_is_busy_and_each_gets_its_own_answer():
    release, seen = threading.Event(), []

    def answer(queries: list[int]) -> list:
        seen.append(list(queries))
        if queries == [0]:
            release.wait(10)  # the first batch holds the only worker while the others arrive
        return [ValueError(f"bad {q}") if q == 3 else q * 10 for q in queries]

    async def main():
        b = MicroBatcher(answer, max_batch=4, threads=1)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit(q)) for q in range(1, 7)]
        await asyncio.sleep(0.05)
        release.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        b.close()
        return out, (b.batches, b.queries)

    out, counts = asyncio.run(main())
    assert seen == [[0], [1, 2, 3, 4], [5, 6]]  # 6 waiting: a full batch of max_batch, then the 2 left
    assert counts == (3, 7)
    assert out[:3] == [0, 10, 20] and out[4:] == [40, 50, 60]
    assert isinstance(out[3], ValueError) and str(out[3]) == "bad 3"  # one query's error is its own


def test_a_batch_that_fails_fails_each_of_its_requests():
    def answer(queries):
        raise RuntimeError("index gone")

    async def main():
        b = MicroBatcher(answer)
        out = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        b.close()
        return out

    assert [str(e) for e in asyncio.run(main())] == ["index gone", "index gone"]


def test_the_wait_holds_a_small_batch_back_until_it_fills_or_times_out():
    sizes = []

    def answer(queries):
        sizes.append(len(queries))
        return queries

    async def main():
        b = MicroBatcher(answer, max_batch=3, max_wait_s=0.2)
        await asyncio.gather(*(b.submit(q) for q in range(3)))  # full at once: no wait
        await asyncio.gather(b.submit(7))  # alone: answered after the wait
        b.close()

    asyncio.run(main())
    assert sizes == [3, 1]
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(answer, max_batch=0)


def test_search_depth_is_a_power_of_two_of_the_request_alone():
    assert search_depth(10, 0, 5000) == 16  # at least 16
    assert search_depth(10, 6, 5000) == 16  # 16 exactly
    assert search_depth(10, 7, 5000) == 32  # 17 -> 32
    assert search_depth(200, 900, 5000) == 2048  # 1100 -> 2048
    assert search_depth(10, 40, 30) == 30  # never more than the catalog


def test_excluded_ids_short_and_long_lists():
    ids = np.array([[5, 7, 9, -1], [1, 2, 3, 4]], dtype=np.int64)
    short = excluded(ids, [np.array([9, 5]), np.zeros(0, dtype=np.int64)])
    assert short.tolist() == [[True, False, True, False], [False, False, False, False]]
    long = excluded(ids, [np.arange(100, 10_000), np.array([4, 2] + list(range(100, 10_000)))])
    assert long.tolist() == [[False, False, False, False], [False, True, False, True]]
    # a long list beside an empty one, unsorted, with an id past every other (searchsorted's end)
    mixed = excluded(ids, [np.zeros(0, dtype=np.int64), np.array([10_000, 3, *range(100, 10_000), 3])])
    assert mixed.tolist() == [[False, False, False, False], [False, False, True, False]]
    assert not excluded(ids, [np.zeros(0, dtype=np.int64)] * 2).any()


def test_a_batch_answers_each_request_as_it_is_answered_alone(hybrid):
    b = hybrid.bundle
    users = [int(u) for u in b.profiles.user_ids[:5]] + [10**12]  # known users and an unknown one
    items = [int(i) for i in b.vocab.item_ids[[3, 50]]]
    queries = [Query(u, None, "homefeed", 5) for u in users] + \
              [Query(u, items[0], "related", 7) for u in users] + \
              [Query(users[0], items[1], "search", 3, False), Query(users[1], 10**15, "related", 5),
               Query(users[2], None, "homefeed", 0)]
    out = hybrid.retrieve_batch(queries)
    for q, got in zip(queries[:-2], out[:-2], strict=True):
        alone = hybrid.retrieve(*q)
        # the same items in the same order; a score may differ in its last float32 bit (batched matmul)
        assert [x["item_id"] for x in got["items"]] == [x["item_id"] for x in alone["items"]], q
        assert [x["score"] for x in got["items"]] == pytest.approx([x["score"] for x in alone["items"]], abs=1e-6)
        assert {k: v for k, v in got.items() if k != "items"} == {k: v for k, v in alone.items() if k != "items"}
    assert {o["path"] for o in out[:-2]} >= {"context", "popularity"} and len({o["release"] for o in out[:-2]}) == 1
    assert isinstance(out[-2], RequestError) and "context.item_id 1000000000000000 is not in the catalog" in str(out[-2])
    assert isinstance(out[-1], RequestError) and "k must be between 1 and" in str(out[-1])
