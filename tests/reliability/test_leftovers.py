"""A killed CLI run leaves no server behind: the temporary Prefect API is tied to the process that started it.

Real processes throughout: a parent is started, starts its children, and is killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from towerflow.procs import process_alive

ROOT = Path(__file__).parents[2]

PARENT = """
import subprocess, time
from towerflow.infra.stack import spawn_tied
tied = spawn_tied(["sleep", "300"])
plain = subprocess.Popen(["sleep", "300"])
print(tied.pid, plain.pid, flush=True)
time.sleep(300)
"""


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_tied_child_dies_with_its_parent_a_plain_one_does_not():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    tied, plain = map(int, parent.stdout.readline().split())
    try:
        assert process_alive(tied) and process_alive(plain)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert gone_within(tied, 5)
        assert not gone_within(plain, 0.5)  # what Prefect's own ephemeral server does: outlives the kill
    finally:
        os.kill(plain, signal.SIGKILL)


CLI_RUN = """
from prefect.settings import PREFECT_API_URL
from towerflow.commands.common import prefect_api
from towerflow.config import Settings
import time
with prefect_api(Settings()):
    print(PREFECT_API_URL.value(), flush=True)
    time.sleep(600)
"""


def _server_pid(port: int) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"prefect.server.api.server:create_app" in cmd and str(port).encode() in cmd:
                return int(proc.name)
    raise AssertionError(f"no Prefect server process listens on port {port}")


@pytest.mark.slow
def test_the_cli_s_temporary_prefect_server_dies_with_a_killed_cli(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("PREFECT_API_URL")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "TOWERFLOW_DATA_ROOT": str(tmp_path / "root"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    parent = subprocess.Popen([sys.executable, "-c", CLI_RUN], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        url = parent.stdout.readline().strip()  # after the server answered /health
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api"), url
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        server = _server_pid(int(url.rsplit(":", 1)[1].split("/")[0]))
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert gone_within(server, 5)
    # nothing answers: refused, or (while the dying socket is torn down) accepted and reset
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(f"{url}/health", timeout=2)


@pytest.mark.slow
def test_the_temporary_server_is_not_mistaken_for_another_that_took_its_port(tmp_path: Path, monkeypatch):
    """Another server on the chosen port answers /health: ours cannot bind it and exits; the CLI must say so, not
    send its flow runs to the other one."""
    import http.server
    import threading

    from towerflow.infra import stack

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    monkeypatch.setattr(stack, "_free_port", lambda: port)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200
        with pytest.raises(stack.StackError, match=rf"exited with code \d+ during start-up \(port {port}\)"), \
                stack.temporary_prefect_server(timeout=120):
            pass
    finally:
        other.shutdown()
        other.server_close()


FLOW_RUN = """
from prefect import flow, get_run_logger
from towerflow.commands.common import prefect_api
from towerflow.config import Settings

@flow
def chatty():
    for i in range(50):
        get_run_logger().info("line %d", i)

with prefect_api(Settings()):
    chatty()
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_run_s_logs_reach_the_temporary_server_before_it_stops(tmp_path: Path):
    # without draining Prefect's log worker inside prefect_api, its exit-time flush finds the server gone and
    # prints "--- Error logging to API ---" after every CLI run (seen at the end of make demo)
    env = {k: v for k, v in os.environ.items() if not k.endswith("PREFECT_API_URL")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "TOWERFLOW_DATA_ROOT": str(tmp_path / "root")}
    proc = subprocess.run([sys.executable, "-c", FLOW_RUN], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "Error logging to API" not in proc.stderr
