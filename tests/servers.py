"""Real servers for tests: a free loopback port, and a FastAPI app served by uvicorn in a thread of the test."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(app, *, timeout_s: float = 60, log_level: str = "error") -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port until the block ends; yields its base URL.

    The app's lifespan runs (startup before the URL is handed out, shutdown at the end), as under ``towerflow
    serve``; a server that does not start within ``timeout_s`` fails the test.
    """
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
