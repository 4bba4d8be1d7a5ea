"""Screenshots of the Prefect and MLflow UIs for the README, taken in headless Chromium.

Starts a private stack (its own data root and ports), generates a small synthetic world, runs one retrain against
the stack, then photographs four pages into docs/img/:

- prefect-flow-run.png: the retrain flow run (task graph and timeline)
- prefect-artifact.png: the ``release-card`` artifact
- mlflow-run.png: the MLflow run (params and metrics)
- mlflow-model.png: the registered model with its ``champion`` alias

The stack is always stopped at the end, even when a step fails.

Usage (as a user that can run Chromium with --no-sandbox, e.g. root in a container):

    .venv/bin/python scripts/screenshots.py [--data-root /tmp/towerflow-shots] [--prefect-port 4310] [--mlflow-port 5310]

Needs a ``chromium`` (or ``chromium-browser``/``google-chrome``) binary on PATH; ``pngquant`` is used when present to
keep the images small.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "docs" / "img"
TOWERFLOW = [sys.executable, "-m", "towerflow.cli"]
AS_OF = "2026-01-05"
LOOKBACK_DAYS = 4
EPOCHS = 2

# A small model so the whole run takes about a minute on 2 cores. The popularity-lift gate is relaxed because a
# 2-epoch model on a 4-day world is not the point of a screenshot; everything else gates as in production.
CONFIG = {
    "examples": {"max_seq_len": 16},
    "train": {"batch_size": 256, "model": {"dim": 32, "d_model": 32, "hidden": 64, "n_layers": 1}},
    "gates": {"min_lift_over_popularity": -1.0},
}


def find_browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found on PATH: install it (Debian: apt-get install -y chromium)")


def sh(cmd: list[str], env: dict[str, str], capture: bool = False) -> str:
    print("+", " ".join(cmd[2:] if cmd[:2] == TOWERFLOW[:2] else cmd), flush=True)
    done = subprocess.run(cmd, env=env, cwd=REPO, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


class Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, run a little JS (close a side panel), snap.

    ``--screenshot`` alone cannot click, and MLflow's UI opens an assistant panel over a third of the page.
    """

    def __init__(self, binary: str, size: tuple[int, int] = (1400, 900)) -> None:
        self.profile = tempfile.mkdtemp(prefix="towerflow-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={self.profile}", f"--window-size={size[0]},{size[1]}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise SystemExit("Chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
        self.ws = connect(ws_url, max_size=64 * 2**20)
        self.next_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive interleaved with replies; only the reply to this call matters
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def shot(self, url: str, out: Path, js: str | None = None, wait_s: float = 6.0) -> None:
        """Open ``url``, give the single-page app ``wait_s`` to fetch and render, run ``js``, save a PNG."""
        print("+ chromium", url, "->", out, flush=True)
        self.call("Page.navigate", url=url)
        time.sleep(wait_s)
        if js:
            self.call("Runtime.evaluate", expression=js)
            time.sleep(1.5)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        if shutil.which("pngquant"):
            subprocess.run(["pngquant", "--force", "--skip-if-larger", "--quality=60-90", "--output", str(out),
                            str(out)], check=False)
        print(f"  {out.stat().st_size / 1024:.0f} KiB", flush=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# Closes MLflow's assistant side panel when it is open (its close button carries this component id).
CLOSE_MLFLOW_ASSISTANT = (
    "document.querySelectorAll('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
    ".forEach(b => b.click())"
)


def flow_run_id(api: str) -> str:
    """The newest ``retrain`` flow run on the stack's Prefect server."""
    body = {"flows": {"name": {"any_": ["retrain"]}}, "sort": "START_TIME_DESC", "limit": 1}
    runs = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).raise_for_status().json()
    if not runs:
        raise SystemExit("no retrain flow run found on the Prefect server")
    return runs[0]["id"]


def artifact_id(api: str, key: str) -> str:
    """The newest artifact under ``key``; its own page shows the content (the key page only lists versions)."""
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    found = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30).raise_for_status().json()
    if not found:
        raise SystemExit(f"no '{key}' artifact on the Prefect server")
    return found[0]["id"]


def experiment_id(mlflow_url: str, run_id: str) -> str:
    run = httpx.get(f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30)
    return run.raise_for_status().json()["run"]["info"]["experiment_id"]


def champion_run_id(mlflow_url: str) -> str:
    """The MLflow run behind the registered model's ``champion`` alias."""
    reply = httpx.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias",
                      params={"name": "towerflow-retrieval", "alias": "champion"}, timeout=30)
    return reply.raise_for_status().json()["model_version"]["run_id"]


def take_shots(browser_binary: str, prefect_url: str, mlflow_url: str, out_dir: Path, mlflow_run: str) -> None:
    flow_run = flow_run_id(f"{prefect_url}/api")
    exp_id = experiment_id(mlflow_url, mlflow_run)
    run_page = f"{mlflow_url}/#/experiments/{exp_id}/runs/{mlflow_run}"
    browser = Browser(browser_binary)
    try:
        browser.shot(f"{prefect_url}/runs/flow-run/{flow_run}", out_dir / "prefect-flow-run.png", wait_s=8)
        browser.shot(f"{prefect_url}/artifacts/artifact/{artifact_id(f'{prefect_url}/api', 'release-card')}", out_dir / "prefect-artifact.png")
        browser.shot(run_page, out_dir / "mlflow-run.png", js=CLOSE_MLFLOW_ASSISTANT)
        browser.shot(f"{run_page}/model-metrics", out_dir / "mlflow-metrics.png", js=CLOSE_MLFLOW_ASSISTANT, wait_s=8)
        browser.shot(f"{mlflow_url}/#/models/towerflow-retrieval", out_dir / "mlflow-model.png",
                     js=CLOSE_MLFLOW_ASSISTANT)
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "towerflow-shots")
    parser.add_argument("--prefect-port", type=int, default=4310)
    parser.add_argument("--mlflow-port", type=int, default=5310)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    parser.add_argument("--shots-only", action="store_true",
                        help="photograph a stack already up on these ports (after a run with --keep)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prefect_url = f"http://127.0.0.1:{args.prefect_port}"
    mlflow_url = f"http://127.0.0.1:{args.mlflow_port}"
    if args.shots_only:
        take_shots(find_browser(), prefect_url, mlflow_url, args.out, champion_run_id(mlflow_url))
        return 0

    find_browser()  # fail before starting anything
    data_root = args.data_root.resolve()
    if data_root.exists():
        # A fresh world each time, so the pages show exactly one retrain.
        sh(TOWERFLOW + ["stack", "down"], env={**os.environ, "TOWERFLOW_DATA_ROOT": str(data_root)})
        shutil.rmtree(data_root)
    data_root.mkdir(parents=True)
    env = {
        **os.environ,
        "TOWERFLOW_DATA_ROOT": str(data_root),
        "PREFECT_HOME": str(data_root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Without this the UI served on a non-default port still calls the API on :4200.
        "PREFECT_UI_API_URL": f"{prefect_url}/api",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    client_env = {**env, "PREFECT_API_URL": f"{prefect_url}/api", "TOWERFLOW_MLFLOW_TRACKING_URI": mlflow_url}
    config_path = data_root / "retrain.json"
    config_path.write_text(json.dumps(CONFIG, indent=2))

    try:
        sh(TOWERFLOW + ["stack", "up", "--prefect-port", str(args.prefect_port), "--mlflow-port",
                        str(args.mlflow_port), "--no-worker"], env)
        sh(TOWERFLOW + ["data", "generate", "--days", "4", "--events-per-day", "3000", "--users", "400",
                        "--items", "600", "--start", "2026-01-01"], env)
        out = sh(TOWERFLOW + ["retrain", "--as-of", AS_OF, "--lookback-days", str(LOOKBACK_DAYS), "--epochs",
                              str(EPOCHS), "--config", str(config_path), "--json"], client_env, capture=True)
        result = json.loads(out[out.index("{"):])
        print(f"retrain: {result['status']} release={result['release_id']} run={result['mlflow_run_id']}")

        take_shots(find_browser(), prefect_url, mlflow_url, args.out, result["mlflow_run_id"])
    finally:
        if not args.keep:
            sh(TOWERFLOW + ["stack", "down"], env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
