"""An acknowledged event survives ``kill -9``: of a process writing the embedded store, and of the Redis server.

A writer process appends batches of 10 events and prints ``ack <n>`` once ``append`` has returned for the first n
events; the test kills it (or the server) with SIGKILL mid-stream and reopens the store: every acknowledged event is
there, and batches are whole (a batch in flight when the kill came is stored entirely or not at all).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.realtime.conftest import RedisServer, redis_store

BATCH = 10
WRITER = """
import sys
from towerflow.serving.realtime.events import check_events
from towerflow.serving.realtime.redis_store import RedisActionStore
from towerflow.serving.realtime.store import SQLiteActionStore

kind, where, prefix = sys.argv[1:4]
store = SQLiteActionStore(where) if kind == "sqlite" else RedisActionStore(where, prefix=prefix)
n = 0
while True:
    rows = [{"event_id": f"e{n + i:06d}", "user_id": (n + i) % 7, "item_id": n + i, "action": "click",
             "ts": "2026-01-05T10:00:00Z", "surface": "homefeed"} for i in range(BATCH_SIZE)]
    try:
        store.append(check_events(rows))
    except Exception as exc:  # the server went away: stop writing, the test looks at what was acknowledged
        print("stopped", type(exc).__name__, flush=True)
        break
    n += len(rows)
    print("ack", n, flush=True)
""".replace("BATCH_SIZE", str(BATCH))


def _writer(*args: str) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen([sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _acked_until(proc: subprocess.Popen, n: int) -> int:
    """Read the writer's acknowledgements until at least ``n`` events; the last count read."""
    acked = 0
    while acked < n:
        line = proc.stdout.readline()
        assert line.startswith("ack "), f"writer said {line!r}"
        acked = int(line.split()[1])
    return acked


def test_sqlite_store_keeps_every_acknowledged_event_after_kill_9_of_the_writer(tmp_path: Path):
    from towerflow.serving.realtime.store import SQLiteActionStore

    path = tmp_path / "realtime.sqlite"
    SQLiteActionStore(path).close()  # the schema exists before the writer starts
    proc = _writer("sqlite", str(path), "-")
    acked = _acked_until(proc, 200)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    acked = max([acked] + [int(x.split()[1]) for x in proc.stdout.read().split("\n") if x.startswith("ack ")])
    store = SQLiteActionStore(path)
    ids = {r[0] for r in store.read(1, store.last_seq())}
    assert {f"e{i:06d}" for i in range(acked)} <= ids
    assert store.count() % BATCH == 0 and store.count() >= acked


def test_redis_store_keeps_every_acknowledged_event_after_kill_9_of_the_server(redis_server: RedisServer):
    prefix = redis_store(redis_server).prefix
    proc = _writer("redis", redis_server.url, prefix)
    acked = _acked_until(proc, 200)
    redis_server.kill()  # the server dies mid-stream: appendfsync always means acknowledged is on disk
    out = proc.communicate(timeout=30)[0]
    acked = max([acked] + [int(x.split()[1]) for x in out.split("\n") if x.startswith("ack ")])
    assert "stopped" in out
    redis_server.start()
    from towerflow.serving.realtime.redis_store import RedisActionStore

    store = RedisActionStore(redis_server.url, prefix=prefix)
    ids = {r[0] for r in store.read(1, store.last_seq())}
    assert {f"e{i:06d}" for i in range(acked)} <= ids
    assert store.count() % BATCH == 0 and store.count() >= acked
