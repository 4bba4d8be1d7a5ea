"""Live events on a real release: POST /events, the next /retrieve reflects them (history and exclude_seen), the
realtime-updated h equals the batch-computed one, and compaction hands them to the source exactly once.

The service here has its own action store and its own copy of the world's source (compaction writes into it), so
the session's shared world is left as the other serving tests expect it.
"""

from __future__ import annotations

import shutil
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from tests.serving.conftest import HORIZON
from towerflow.data.source import ParquetSource
from towerflow.serving.realtime.store import SQLiteActionStore
from towerflow.serving.state_store import SQLiteUserStateStore
from towerflow.serving.states import compute_user_states
from towerflow.tasks.history import EventArrays, to_us

T_LIVE = HORIZON + timedelta(hours=10)  # after every event of the world, before the machine's clock


@pytest.fixture(scope="module")
def live(served, tmp_path_factory):
    """(service, its TestClient, the source copy's URI) with an empty action store of its own."""
    from fastapi.testclient import TestClient

    from towerflow.serving.app import create_app
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    root = tmp_path_factory.mktemp("realtime")
    shutil.copytree(served.settings.source, root / "source")
    source = ParquetSource(str(root / "source"))
    svc = RetrievalService(served.settings, ServingConfig(compact_interval_s=None), source=source,
                           realtime=SQLiteActionStore(root / "realtime.sqlite")).start(watch=False)
    with TestClient(create_app(service=svc)) as client:
        yield svc, client, source.uri
    svc.close()


@pytest.fixture(scope="module")
def user(served) -> int:
    """A user with a stored state of the champion."""
    states = SQLiteUserStateStore(served.settings.user_states_path).get(list(range(200)), served.champion.release_id)
    return sorted(u for u, s in states.items() if len(s.seen_items) >= 3)[0]


def event(i: int, user: int, item: int, action: str = "click", seconds: int = 0, **kw) -> dict:
    return {"event_id": f"live-{user}-{i}", "user_id": user, "item_id": item, "action": action,
            "ts": (T_LIVE + timedelta(seconds=seconds)).isoformat(), "surface": "homefeed", **kw}


def test_an_ingested_action_reaches_the_next_retrieve(live, served, user, world_events, champion_release):
    svc, client, _ = live
    before = client.post("/retrieve", json={"user_id": user, "k": 10}).json()
    assert before["path"] == "state"
    top, second = before["items"][0]["item_id"], before["items"][1]["item_id"]
    batch = [event(0, user, top), event(1, user, second, "skip", seconds=5, surface="related", context_item_id=top)]
    r = client.post("/events", json={"events": batch})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 2, "duplicates": 0, "last_seq": 2}

    after = client.post("/retrieve", json={"user_id": user, "k": 10}).json()
    assert after["path"] == "live"  # the state is older than the user's newest action: h recomputed
    ids = [i["item_id"] for i in after["items"]]
    assert top not in ids and second not in ids and len(ids) == 10  # exclude_seen covers them at once
    every = client.post("/retrieve", json={"user_id": user, "k": 10, "exclude_seen": False}).json()
    assert every["path"] == "live" and every["items"] != before["items"]

    # the realtime h is the batch h (tasks/history.py via the refresh flow's compute_user_states) of the same actions
    b = svc.bundle
    h_live, seen, path = svc._history(b, user)
    mine = world_events[world_events.user_id == user]
    both = pd.concat([mine, _frame(batch)], ignore_index=True)
    (state,) = compute_user_states(champion_release, b.vocab, EventArrays.from_events(both),
                                   to_us(T_LIVE) + 5_000_001, b.history, item_table=b.item_table)
    assert path == "live"
    np.testing.assert_allclose(h_live, state.h, rtol=0, atol=1e-6)
    assert seen.tolist() == state.seen_items.tolist() and seen[:2].tolist() == [second, top]
    stored = SQLiteUserStateStore(served.settings.user_states_path).get([user], b.release_id)[user]
    assert not np.allclose(stored.h, h_live, atol=1e-4)  # the live actions changed h


def _frame(rows: list[dict]) -> pd.DataFrame:
    from towerflow.serving.realtime.events import check_events

    return check_events(rows)


def test_ingest_is_idempotent_and_refuses_bad_batches_whole(live, user):
    svc, client, _ = live
    items = [int(i) for i in svc.bundle.vocab.item_ids[:3]]
    first = [event(10, user, items[0]), event(11, user, items[1], seconds=1)]
    n = svc.live.store.last_seq()
    assert client.post("/events", json={"events": first}).json() == {"accepted": 2, "duplicates": 0,
                                                                     "last_seq": n + 2}
    assert client.post("/events", json={"events": first}).json() == {"accepted": 0, "duplicates": 2,
                                                                     "last_seq": n + 2}
    cases = [
        ([event(12, user, items[2]), event(13, user, items[2], action="like")], 422,
         "events[1].action: 'like' is not one of"),
        ([event(12, user, items[2]), event(14, 10**9, items[2])], 422,
         "events[1].user_id: 1000000000 is unknown to the source's users table"),
        # a search query: /retrieve's and the gate's rule (at most 256 characters, search surface only)
        ([event(12, user, items[2]), event(15, user, items[2], surface="search", query="q" * 257)], 422,
         "events[1].query has 257 characters; at most 256 are allowed"),
        ([event(12, user, items[2]), event(16, user, items[2], query="red shoes")], 422,
         "events[1].query is only allowed on the 'search' surface, got surface 'homefeed'"),
        ([event(12, user, items[2]), {**first[0], "item_id": items[2]}], 409,
         f"events[1].event_id: 'live-{user}-10' is already stored as a different event"),
    ]
    for rows, status, message in cases:
        r = client.post("/events", json={"events": rows})
        assert r.status_code == status and r.json()["detail"].startswith(message), r.text
        assert r.json()["row"] == 1
    assert svc.live.store.last_seq() == n + 2  # nothing of a refused batch was stored (event 12 either)
    r = client.post("/events", json={"events": []})
    assert r.status_code == 422 and "events" in r.json()["detail"]
    info = client.get("/release").json()["realtime"]
    assert info == {"store": "sqlite", "last_seq": n + 2, "compacted_through": 0, "last_compaction": None}


def test_compaction_hands_every_event_to_the_source_once_and_serving_is_unchanged(live, user):
    svc, client, source_uri = live
    before = client.post("/retrieve", json={"user_id": user, "k": 10}).json()
    h_before = svc._history(svc.bundle, user)[0]
    stored = svc.live.store.read(1, svc.live.store.last_seq())
    out = svc.live.compact(source_uri)
    assert out.events == len(stored) and out.high_water == len(stored)
    assert out.files == [f"events/dt={T_LIVE.date().isoformat()}/rt-{1:012d}-{len(stored):012d}.parquet"]
    assert svc.live.compact(source_uri).events == 0  # nothing new: nothing written

    day = ParquetSource(source_uri).read_day(T_LIVE.date())
    mine = day[day.event_id.str.startswith("live-")].sort_values("event_id")
    assert sorted(mine.event_id) == sorted(r[0] for r in stored)  # each exactly once
    # after the service re-reads the source, the compacted actions are in both: counted once
    svc.reload_events()
    h_after, _, path = svc._history(svc.bundle, user)
    assert path == "live"
    np.testing.assert_allclose(h_after, h_before, rtol=0, atol=1e-6)
    assert client.post("/retrieve", json={"user_id": user, "k": 10}).json()["items"] == before["items"]



def test_retention_after_compaction_keeps_what_a_request_reads(served, user, tmp_path):
    """Compaction then prune (the service's watcher step): of a user's 5 live actions the store keeps the last 3
    (``realtime_max_actions``, what a request reads), the source holds all 5, and the next answer is unchanged."""
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    shutil.copytree(served.settings.source, tmp_path / "source")
    source, store = ParquetSource(str(tmp_path / "source")), SQLiteActionStore(tmp_path / "realtime.sqlite")
    svc = RetrievalService(served.settings, ServingConfig(compact_interval_s=None, realtime_max_actions=3),
                           source=source, realtime=store).start(watch=False)
    items = [int(i) for i in svc.bundle.vocab.item_ids[10:15]]
    svc.ingest([event(100 + i, user, item, seconds=i) for i, item in enumerate(items)])
    before = svc.retrieve(user, k=10)
    assert before["path"] == "live"
    out = svc.live.compact(source.uri, prune_before_us=svc._history_horizon_us())
    assert out.events == 5 and svc.live.last_compaction["pruned"] == 2
    assert [r[2] for r in store.recent(user)] == items[2:] and store.count() == 3
    day = ParquetSource(source.uri).read_day(T_LIVE.date())
    assert sorted(day[day.event_id.str.startswith("live-")].item_id) == sorted(items)
    assert svc.retrieve(user, k=10) == before
    svc.close()


@pytest.fixture(scope="module")
def replay_server(served, tmp_path_factory):
    """A real HTTP server over a service whose source stops before the world's last day (Jan 4), no stored
    states, an empty action store: replaying Jan 4 into it is what a live day looks like."""
    from tests.servers import running_app
    from towerflow.serving.app import create_app
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    root = tmp_path_factory.mktemp("replay")
    shutil.copytree(served.settings.source, root / "source")
    shutil.rmtree(root / "source" / "events" / "dt=2026-01-04")
    store = SQLiteActionStore(root / "realtime.sqlite")
    svc = RetrievalService(served.settings, ServingConfig(compact_interval_s=None),
                           source=ParquetSource(str(root / "source")), realtime=store,
                           use_default_store=False).start(watch=False)
    with running_app(create_app(service=svc)) as url:
        yield url, store
    svc.close()


def test_replay_a_day_asks_before_each_engagement_in_time_order(served, replay_server, capsys):
    import json

    from towerflow.cli import main
    from towerflow.contract import POSITIVE_ACTIONS

    url, store = replay_server
    day = ParquetSource(served.settings.source).read_day(HORIZON.date() - timedelta(days=1))
    first = day.sort_values(["ts", "event_id"]).head(300)
    assert main(["events", "replay", "--day", "2026-01-04", "--url", url, "--from", served.settings.source,
                 "--limit", "300", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    engaged = int(first.action.isin(POSITIVE_ACTIONS).sum())
    assert out["events"] == 300 and out["engagements"] == engaged > 0
    assert sum(out["paths"].values()) == engaged and out["paths"].get("live", 0) > 0
    assert 0 <= out["hits"] <= engaged and out["recall_at_k"] == round(out["hits"] / engaged, 4)
    by_surface = {s: v["engagements"] for s, v in out["recall_at_k_by_surface"].items()}
    assert by_surface == first[first.action.isin(POSITIVE_ACTIONS)].surface.value_counts().to_dict()
    assert sum(v["new_engagements"] for v in out["recall_at_k_by_surface"].values()) == out["new_engagements"]
    assert [r[0] for r in store.read(1, store.last_seq())] == first.event_id.tolist()  # in time order, once
    assert main(["events", "replay", "--day", "2026-01-04", "--url", url, "--from", served.settings.source,
                 "--limit", "300", "--json"]) == 0  # replayed again: nothing stored twice
    assert store.last_seq() == 300


@pytest.mark.slow
def test_kill_9_of_the_service_mid_replay_loses_no_acknowledged_event(served, tmp_path):
    """``towerflow serve`` as a real process, SIGKILLed while events are being posted, then restarted: every
    acknowledged event is in the store, and after compaction in the source exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from tests.servers import free_port
    from towerflow.serving.realtime.compact import compact
    from towerflow.serving.realtime.events import check_events
    from towerflow.serving.realtime.replay import Client, ReplayError, _json_rows

    shutil.copytree(served.settings.source, tmp_path / "source")
    shutil.rmtree(tmp_path / "source" / "events" / "dt=2026-01-04")
    rt = tmp_path / "realtime.sqlite"
    env = {**os.environ, "TOWERFLOW_DATA_ROOT": str(served.root), "TOWERFLOW_SOURCE_URI": str(tmp_path / "source"),
           "TOWERFLOW_REALTIME_URI": f"sqlite:///{rt}"}
    port = free_port()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "towerflow.cli", "serve", "--port", str(port),
                                 "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "towerflow serve did not come up"
            try:
                client = Client(f"http://127.0.0.1:{port}", timeout_s=5)
                if client.post("/retrieve", {"user_id": 0, "k": 1})[0] == 200:
                    return proc
            except ReplayError:
                pass
            time.sleep(0.2)

    day = ParquetSource(served.settings.source).read_day(HORIZON.date() - timedelta(days=1))
    rows = _json_rows(day.sort_values(["ts", "event_id"]))
    batches = [rows[i:i + 10] for i in range(0, len(rows), 10)]
    proc = start()
    acked: list[str] = []
    client = Client(f"http://127.0.0.1:{port}")
    with pytest.raises(ReplayError):
        for n, b in enumerate(batches):
            status, reply = client.post("/events", {"events": b})
            assert status == 200, reply
            acked += [e["event_id"] for e in b]
            if n == 5:  # SIGKILL while the next batches are being posted
                threading.Timer(0.05, lambda: proc.send_signal(signal.SIGKILL)).start()
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL and 0 < len(acked) < len(rows)

    store = SQLiteActionStore(rt)
    stored = [r[0] for r in store.read(1, store.last_seq())]
    assert set(acked) <= set(stored)
    assert len(stored) - len(acked) in (0, 10)  # the batch in flight at the kill: stored whole or not at all

    proc = start()  # restarted: the rest of the day, the acknowledged part posted again (idempotent)
    try:
        client = Client(f"http://127.0.0.1:{port}")
        for b in batches:
            assert client.post("/events", {"events": b})[0] == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    compact(store, str(tmp_path / "source"))
    back = ParquetSource(str(tmp_path / "source")).read_day(HORIZON.date() - timedelta(days=1))
    assert len(back) == len(day) and sorted(back.event_id) == sorted(day.event_id)  # each exactly once
    expect = check_events(day, now=HORIZON + timedelta(days=1)).sort_values("event_id").reset_index(drop=True)
    got = back.sort_values("event_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expect[list(got.columns)], check_dtype=False)
