"""``towerflow stack up|down|status``: the local Prefect server, MLflow server and process worker (infra/stack.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="start, stop and inspect the local Prefect + MLflow + worker stack",
                       description="A local stack bound to 127.0.0.1; pids and logs live under <data_root>/stack/.")
    ssub = p.add_subparsers(dest="stack_command", metavar="SUBCOMMAND", required=True)

    u = ssub.add_parser("up", help="start the Prefect server, the MLflow server and a worker; print their URLs")
    u.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default 4200)")
    u.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    u.add_argument("--work-pool", default="towerflow-process", help="process work pool to create and serve")
    u.add_argument("--no-mlflow", action="store_true", help="start only Prefect and the worker")
    u.add_argument("--no-worker", action="store_true", help="do not start a worker")
    u.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each service to answer")
    u.set_defaults(handler=_up)

    d = ssub.add_parser("down", help="stop every service of the stack")
    d.set_defaults(handler=_down)

    s = ssub.add_parser("status", help="show which services run and answer")
    s.set_defaults(handler=_status)


def _data_root() -> Path:
    from towerflow.config import Settings

    return Settings().data_root


def _recorded():
    from towerflow.infra.stack import StackConfig

    return StackConfig.load(_data_root()) or StackConfig(data_root=_data_root())


def _print_status(rows) -> None:
    for r in rows:
        state = "healthy" if r.healthy else ("running, not answering" if r.running else "stopped")
        pid = f"pid {r.pid}" if r.pid else "-"
        print(f"  {r.name:<8} {state:<24} {pid:<11} {r.url}  (log {r.log})")


def _up(args: argparse.Namespace) -> int:
    from towerflow.infra.stack import StackConfig, up
    from towerflow.progress import say

    services = tuple(s for s in ("prefect", "mlflow", "worker")
                     if not (s == "mlflow" and args.no_mlflow) and not (s == "worker" and args.no_worker))
    cfg = StackConfig(data_root=_data_root(), prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
                      work_pool=args.work_pool, services=services)
    rows = up(cfg, timeout=args.timeout, say=say)
    print("stack is up:")
    _print_status(rows)
    print(f"\nPrefect UI: {cfg.prefect_url}")
    if "mlflow" in services:
        print(f"MLflow UI:  {cfg.mlflow_url}")
    print("\nExport these to use the stack from this shell, then deploy with 'prefect deploy --all':")
    for k, v in cfg.client_env().items():
        print(f"export {k}={v}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from towerflow.infra.stack import down
    from towerflow.progress import say

    stopped = down(_recorded(), say=say)
    print("stack stopped" if stopped else "nothing was running")
    return 0


def _status(args: argparse.Namespace) -> int:
    from towerflow.infra.stack import status

    rows = status(_recorded())
    _print_status(rows)
    return 0 if all(r.healthy for r in rows) else 1
