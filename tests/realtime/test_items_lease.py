"""Service replicas on several hosts share one Redis store and one source: the items table's writers exclude each
other through the store's lease, where the file lock (one per host) cannot. Against the real redis-server."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.realtime.conftest import redis_store
from towerflow.data.source import ParquetSink, ParquetSource
from towerflow.serving.realtime.live_items import ITEMS_LEASE, append_items, check_items
from towerflow.serving.realtime.store import ActionStoreError, held_lease

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def item(i: int) -> dict:
    return {"item_id": i, "category": "topic_01", "genres": None, "title": f"Item {i}", "created_ts": None,
            "features": [0.5, -1.0, 2.0]}


def source_with_one_item(root: Path) -> ParquetSource:
    ParquetSink(str(root)).write_items(check_items([item(1)], dense_dim=3, now=NOW))
    return ParquetSource(str(root))


def two_hosts(tmp_path: Path, shared, hook, ids=((10, 11, 12), (20, 21, 22))) -> ParquetSource:
    """Two writers in threads, each with its own lock file (two hosts), adding one item per call; ``hook`` runs
    between their read of the table and their write."""
    source = source_with_one_item(tmp_path / "source")
    errors: list[BaseException] = []

    def host(n: int) -> None:
        try:
            for i in ids[n]:
                append_items(source, check_items([item(i)], dense_dim=3, now=NOW), tmp_path / f"host{n}.lock",
                             before_write=hook, shared=shared)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(n,), name=f"host{n}") for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:1]
    return source


def test_without_a_shared_lease_two_hosts_lose_a_write(tmp_path: Path):
    # both read the table before either writes (they meet inside), host1 writes 0.3 s after host0 (two writes of
    # one temporary name at once would fail otherwise): host1's table, read before host0's write, drops its row
    meet = threading.Barrier(2, timeout=20)

    def hook(n: int) -> None:
        meet.wait()
        time.sleep(0.3 if threading.current_thread().name == "host1" else 0.0)

    source = two_hosts(tmp_path, None, hook, ids=((10,), (20,)))
    assert sorted(source.read_items()["item_id"].tolist()) == [1, 20]


def test_with_the_redis_lease_no_write_is_lost_and_writers_take_turns(tmp_path: Path, redis_server):
    store = redis_store(redis_server)
    inside, most = [0], [0]

    def hook(n: int) -> None:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)  # the other host's writer arrives meanwhile and waits for the lease
        inside[0] -= 1

    source = two_hosts(tmp_path, store, hook)
    assert sorted(source.read_items()["item_id"].tolist()) == [1, 10, 11, 12, 20, 21, 22]
    assert most[0] == 1
    assert store.lock(ITEMS_LEASE, 1) is not None  # released after each write
    store.close()


def test_a_lease_held_elsewhere_is_waited_for_then_refused_by_name(redis_server):
    store = redis_store(redis_server)
    other = store.lock(ITEMS_LEASE, 30)  # another replica holds it
    t0 = time.monotonic()
    refused = r"items-table: the lease in redis://.* stayed held by another writer for 0.3s"
    with pytest.raises(ActionStoreError, match=refused), held_lease(store, ITEMS_LEASE, wait_s=0.3):
        pass
    assert time.monotonic() - t0 >= 0.3
    store.unlock(ITEMS_LEASE, other)
    with held_lease(store, ITEMS_LEASE, ttl_s=5, wait_s=0.3) as token:
        assert store.lock(ITEMS_LEASE, 1) is None and token
    assert store.lock(ITEMS_LEASE, 1) is not None
    store.close()


def test_a_service_on_a_redis_store_takes_its_lease_and_one_on_sqlite_its_file_lock_only(tmp_path: Path,
                                                                                          redis_server, monkeypatch):
    from towerflow.config import Settings
    from towerflow.serving.realtime.store import SQLiteActionStore
    from towerflow.serving.service import RetrievalService

    monkeypatch.setenv("TOWERFLOW_DATA_ROOT", str(tmp_path))
    store, embedded = redis_store(redis_server), SQLiteActionStore(tmp_path / "realtime.sqlite")
    assert RetrievalService(Settings(), use_default_store=False, realtime=store).items.shared is store
    assert RetrievalService(Settings(), use_default_store=False, realtime=embedded).items.shared is None
    store.close()
    embedded.close()
