"""bench/index_served.py: replaying recorded searches and scoring them as the index gate does, on a hand-made catalog."""

from __future__ import annotations

import numpy as np

from bench import index_served
from towerflow.config import IndexConfig
from towerflow.tasks.build_index import build_index
from towerflow.tasks.embed_items import ItemEmbeddings


def _catalog() -> ItemEmbeddings:
    # six unit vectors at 0, 20, 40, ..., 100 degrees, ids 10..15: query (1, 0) ranks them 10, 11, 12, ... in order
    angles = np.deg2rad(np.arange(6) * 20.0)
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    return ItemEmbeddings("r-20260101T000000-abcdef", np.arange(10, 16, dtype=np.int64), vectors)


def test_replay_answers_each_call_at_its_depth_and_recall_counts_misses_per_query():
    emb = _catalog()
    flat = build_index(emb, IndexConfig(kind="flat")).index
    east = np.array([[1.0, 0.0]], np.float32)
    north = np.array([[np.cos(np.deg2rad(100)), np.sin(np.deg2rad(100))]], np.float32)  # item 15's own direction
    calls = [(0, east, 2), (0, north, 4)]  # one batch, two depth buckets
    got, seconds = index_served._replay(flat, None, calls, passes=1)
    assert [g.tolist() for g in got] == [[[10, 11]], [[15, 14, 13, 12]]] and seconds >= 0
    batched, _ = index_served._replay(flat, None, calls, one_batch=True, passes=1)  # one search at depth 4, cut back
    assert [g.tolist() for g in batched] == [g.tolist() for g in got]
    assert index_served._recall(emb.vectors, emb.item_ids, calls, got, None) == 1.0
    # east's depth-2 answer misses 11 (12 ranks third): 1/2; north's depth-4 answer is the exact 4: 1 -> mean 0.75
    wrong = [np.array([[10, 12]]), got[1]]
    assert index_served._recall(emb.vectors, emb.item_ids, calls, wrong, None) == 0.75
    # recall@1: both first answers are the exact best
    assert index_served._recall(emb.vectors, emb.item_ids, calls, wrong, 1) == 1.0
