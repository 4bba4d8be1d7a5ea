"""``towerflow serve query`` (what the demo prints) and ``towerflow serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from towerflow.cli import main


@pytest.fixture
def torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the command sets the process's thread count; put back this test process's


def test_serve_query_prints_the_champions_answer(served, capsys, monkeypatch, torch_threads):
    served.env(monkeypatch)
    from towerflow.serving.state_store import SQLiteUserStateStore

    store = SQLiteUserStateStore(served.settings.user_states_path)
    user = min(store.get(list(range(1000)), served.champion.release_id))
    assert main(["serve", "query", str(user), "-k", "4", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["release"] == served.champion.release_id and body["path"] == "state" and len(body["items"]) == 4
    assert main(["serve", "query", str(user), "-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"release {served.champion.release_id} (version 2) - user {user}, homefeed, via state")
    assert [int(line.split()[2]) for line in lines[1:]] == [i["item_id"] for i in body["items"]]
    assert main(["serve", "query", str(user), "--context-item", "987654321"]) == 1
    assert "context.item_id 987654321 is not in the catalog" in capsys.readouterr().err
    assert main(["serve", "query", str(user), "--surface", "search", "--query", "kalo", "-k", "4"]) == 0
    assert f"user {user}, search searching 'kalo', via state" in capsys.readouterr().out
    assert main(["serve", "query", str(user), "--query", "kalo"]) == 1  # a query off the search surface
    assert "only allowed on the 'search' surface" in capsys.readouterr().err


def test_towerflow_serve_runs_the_http_service(served, monkeypatch):
    served.env(monkeypatch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "towerflow.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("towerflow serve did not become healthy")
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"user_id": 1, "k": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["release"] == served.champion.release_id
        assert len(r.json()["items"]) == 3
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=30).status_code == 404  # no --docs
        # a declared 100 MB body is refused before any of it is sent
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 104857600\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):  # the server closes the connection after its answer
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413") and b"the limit is 65536 bytes" in reply
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_serve_refresh_runs_the_refresh_flow_and_says_what_it_stored(served, monkeypatch):
    # a subprocess, not capsys: Prefect's log handlers would keep capsys's stream after the test closes it
    served.env(monkeypatch)
    proc = subprocess.run([sys.executable, "-m", "towerflow.cli", "serve", "refresh"], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("stored ") and f"for release {served.champion.release_id} (version 2)" in proc.stdout
