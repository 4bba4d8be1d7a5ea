"""The user-state stores: exact round trips, one release per answer, replacement, pruning, threads."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from towerflow.serving.state_store import (
    InMemoryUserStateStore,
    SQLiteUserStateStore,
    UserState,
    UserStateStore,
)

A, B = "r-20260101T000000-aaaaaa", "r-20260102T000000-bbbbbb"
T = datetime(2026, 1, 5, tzinfo=UTC)


def state(user: int, release: str, value: float, dim: int = 4) -> UserState:
    return UserState(user, release, np.arange(dim, dtype=np.float32) * value,
                     T - timedelta(microseconds=user), T, np.array([user * 10, user * 10 + 1]))


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path) -> UserStateStore:
    return SQLiteUserStateStore(tmp_path / "s.sqlite") if request.param == "sqlite" else InMemoryUserStateStore()


def test_round_trip_is_exact_and_answers_for_one_release_only(store):
    assert isinstance(store, UserStateStore)
    assert store.put([state(1, A, 0.5), state(2, A, 1.5), state(1, B, -2.0)]) == 3
    got = store.get([1, 2, 3], A)
    assert sorted(got) == [1, 2]  # user 3 has no state
    assert got[1].h.dtype == np.float32 and got[1].h.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert got[2].h.tolist() == [0.0, 1.5, 3.0, 4.5]
    assert got[1].release_id == A and got[1].seen_items.tolist() == [10, 11]
    assert got[1].last_event_ts == T - timedelta(microseconds=1) and got[1].as_of == T
    assert store.get([1], B)[1].h.tolist() == [0.0, -2.0, -4.0, -6.0]
    assert store.get([2], B) == {}  # user 2 was only refreshed with release A
    assert store.get([1], "r-20260103T000000-cccccc") == {}


def test_put_replaces_a_users_state_of_the_same_release(store):
    store.put([state(1, A, 1.0)])
    store.put([state(1, A, 3.0)])
    assert store.get([1], A)[1].h.tolist() == [0.0, 3.0, 6.0, 9.0]


def test_sqlite_prune_keeps_the_newest_releases_and_survives_reopening(tmp_path):
    path = tmp_path / "s.sqlite"
    s = SQLiteUserStateStore(path)
    s.put([state(1, A, 1.0), state(2, A, 1.0)])
    s.put([state(1, B, 2.0)])
    assert s.releases() == {B: 1, A: 2}  # newest written first
    assert s.prune(keep=1) == [A]
    s.close()
    reopened = SQLiteUserStateStore(path)
    assert reopened.releases() == {B: 1}
    assert reopened.get([1, 2], A) == {} and reopened.get([1], B)[1].h.tolist() == [0.0, 2.0, 4.0, 6.0]


def test_sqlite_large_batches_and_concurrent_readers(tmp_path):
    s = SQLiteUserStateStore(tmp_path / "s.sqlite")
    s.put(state(u, A, float(u), dim=8) for u in range(1, 1201))  # more ids than one IN (...) chunk
    got = s.get(list(range(1, 1201)), A)
    assert len(got) == 1200 and got[1200].h[1] == 1200.0
    errors, sums = [], []

    def read() -> None:
        try:
            for _ in range(20):
                sums.append(sum(float(v.h[1]) for v in s.get(list(range(1, 101)), A).values()))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    s.put(state(u, B, 1.0, dim=8) for u in range(1, 500))  # a writer at the same time
    for t in threads:
        t.join()
    assert errors == [] and set(sums) == {5050.0}  # 1 + 2 + ... + 100
