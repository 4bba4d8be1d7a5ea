"""The backfill deployment end to end: a real Prefect server and process worker on loopback (started by
infra/stack.py, PREFECT_HOME in tmp), ``prefect deploy`` from the repository's prefect.yaml, two triggers of the
same range with parameters; the first runs both days, the second skips them.

``tiny_source`` has k events on day k of January 2026, so with lookback 2 the windows of Jan 3 and Jan 4 hold
1 + 2 = 3 and 2 + 3 = 5 events.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from towerflow.backfill import Ledger
from towerflow.infra.stack import StackConfig, StackError, down, read_pid, up

REPO = Path(__file__).resolve().parents[2]
RANGE = ("--param", "start=2026-01-03", "--param", "end=2026-01-04", "--param", "retrain=false",
         "--param", "lookback_days=2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(cfg: StackConfig, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **cfg.client_env(), "PREFECT_HOME": str(cfg.prefect_home), "PREFECT_CLI_PROMPT": "false"}
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _latest_summary(cfg: StackConfig) -> str:
    r = httpx.post(f"{cfg.prefect_api_url}/artifacts/filter", timeout=10,
                   json={"artifacts": {"key": {"any_": ["backfill-summary"]}}, "sort": "CREATED_DESC", "limit": 1})
    r.raise_for_status()
    return r.json()[0]["data"]


@pytest.fixture
def stack(data_root: Path) -> Iterator[StackConfig]:
    cfg = StackConfig(data_root=data_root, prefect_port=_free_port(), services=("prefect", "worker"),
                      worker_query_seconds=1.0,
                      # the root conftest turns API logging off for in-process tests; flow runs here should log
                      extra_env={"PREFECT_LOGGING_TO_API_ENABLED": "true"})
    try:
        up(cfg, timeout=150, say=lambda _msg: None)
        yield cfg
    finally:
        down(cfg, grace=10, say=lambda _msg: None)
        assert read_pid(cfg, "prefect") is None and read_pid(cfg, "worker") is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_backfill_deployment_runs_a_range_then_skips_it(stack: StackConfig, tiny_source: str, data_root: Path):
    deployed = _prefect(stack, "deploy", "--name", "backfill", timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "backfill/backfill" in deployed.stdout
    # deployable from any checkout: the flow is imported from the installed package, no directory is recorded
    dep = httpx.get(f"{stack.prefect_api_url}/deployments/name/backfill/backfill", timeout=10).json()
    assert dep["entrypoint"] == "towerflow.flows.backfill:backfill" and dep["pull_steps"] == []
    assert str(REPO) not in json.dumps(dep), json.dumps(dep)

    first = _prefect(stack, "deployment", "run", "backfill/backfill", *RANGE, "--watch", "--watch-timeout", "240",
                     timeout=270)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Flow run finished successfully in 'Completed'" in first.stdout
    entries = Ledger(data_root / "backfill" / "ledger.sqlite").entries()
    assert [(str(e.day), e.work, e.lookback_days) for e in entries] == [
        ("2026-01-03", "extract", 2), ("2026-01-04", "extract", 2)]
    summary = _latest_summary(stack)
    assert "2 ran, 0 skipped, 0 failed" in summary
    assert "| 2026-01-03 | ran |" in summary and "| 3 |" in summary and "| 5 |" in summary

    second = _prefect(stack, "deployment", "run", "backfill/backfill", *RANGE, "--watch", "--watch-timeout", "240",
                      timeout=270)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 ran, 2 skipped, 0 failed" in _latest_summary(stack)
    assert Ledger(data_root / "backfill" / "ledger.sqlite").entries() == entries  # nothing was redone


def test_stack_up_names_a_busy_port(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = StackConfig(data_root=tmp_path, prefect_port=port, services=("prefect",))
        with pytest.raises(StackError, match=f"prefect: port {port} on 127.0.0.1 is already in use"):
            up(cfg, say=lambda _msg: None)
    assert read_pid(cfg, "prefect") is None


def test_stack_config_round_trips_and_rejects_a_worker_without_server(tmp_path: Path):
    cfg = StackConfig(data_root=tmp_path, prefect_port=4321, mlflow_port=5432)
    cfg.stack_dir.mkdir(parents=True)
    (cfg.stack_dir / "stack.json").write_text(cfg.to_json())
    assert StackConfig.load(tmp_path) == cfg
    assert cfg.client_env() == {"PREFECT_API_URL": "http://127.0.0.1:4321/api",
                                "TOWERFLOW_PREFECT_API_URL": "http://127.0.0.1:4321/api",
                                "TOWERFLOW_DATA_ROOT": str(tmp_path.resolve()),
                                "TOWERFLOW_MLFLOW_TRACKING_URI": "http://127.0.0.1:5432"}
    with pytest.raises(StackError, match="the worker needs the Prefect server"):
        StackConfig(data_root=tmp_path, services=("worker",))
