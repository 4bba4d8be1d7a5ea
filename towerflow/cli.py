"""The ``towerflow`` console script: one entry point for every command.

Each command group lives in ``towerflow/commands/<group>.py`` and exposes ``register(subparsers)``; handlers are
thin wrappers over library functions and import heavy dependencies (torch, prefect, mlflow) only when they run,
so ``towerflow --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

GROUPS = ("data", "retrain", "backfill", "release", "serve", "events", "items", "stack")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="towerflow",
        description="Auto-retraining for two-tower retrieval: data, retrain, backfill, release, serve, events, items, stack.",
        epilog="Settings come from TOWERFLOW_* environment variables (TOWERFLOW_DATA_ROOT, "
        "TOWERFLOW_MLFLOW_TRACKING_URI, TOWERFLOW_PREFECT_API_URL). Run 'towerflow COMMAND --help' for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        try:
            module = importlib.import_module(f"towerflow.commands.{group}")
        except ModuleNotFoundError as exc:
            if exc.name != f"towerflow.commands.{group}":
                raise
            continue
        module.register(sub)
    return parser


# Defaults for a laptop run, set when the CLI runs (not at import); the user's own values win.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # a fresh ephemeral API migrates its database first (~18 s, more on a busy machine)
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def main(argv: list[str] | None = None) -> int:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's job is to turn any failure into a readable line
        from towerflow.errors import is_user_error

        if not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
