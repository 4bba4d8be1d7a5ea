"""Thin Prefect tasks over the pure stage functions in tasks/ and validation/.

A task here does only what the pure function must not: read and write files, log to MLflow, publish Prefect
artifacts, and turn failures into ``StageFailed`` naming the stage. Expensive stages keep their output in a
content-addressed work directory (``<data_root>/work/<stage>/<key>``) so a failed run, started again with the same
inputs, resumes from its last good stage instead of recomputing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from towerflow.errors import TowerflowError


class StageFailed(TowerflowError):
    """A stage of the retrain flow failed; the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage, self.cause = stage, cause
        super().__init__(f"stage '{stage}' failed: {cause}")


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (ids, configs) that identifies a stage's output."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_io_error(task, task_run, state) -> bool:  # Prefect retry_condition_fn: retry I/O, never a gate
    try:
        state.result()
    except StageFailed as exc:
        return isinstance(exc.cause, OSError | TimeoutError | ConnectionError)
    except Exception:  # noqa: BLE001
        return False
    return False


def stage(name: str, io_retries: int = 0) -> Callable:
    """Make ``fn`` a Prefect task called ``name`` whose failures surface as StageFailed(name, cause)."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except StageFailed:
                raise
            except Exception as exc:
                raise StageFailed(name, exc) from exc

        options: dict[str, Any] = {"name": name, "cache_policy": NO_CACHE}
        if io_retries:
            options |= {"retries": io_retries, "retry_delay_seconds": 1, "retry_condition_fn": _is_io_error}
        return task(**options)(wrapper)

    return deco


def cached(directory: Path, compute: Callable[[Path], Any], load: Callable[[Path], Any], what: str) -> Any:
    """Return ``load(directory)`` when a previous run completed it, else ``compute(tmp)`` then publish atomically.

    ``compute`` writes into a temporary sibling directory; the ``_SUCCESS`` marker and the rename make a half-written
    output invisible, so a crash mid-stage is simply recomputed on the next run.
    """
    log = get_run_logger()
    if (directory / "_SUCCESS").exists():
        log.info(f"{what}: reusing {directory} from an earlier run")
        return load(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    compute(tmp)
    (tmp / "_SUCCESS").write_text("")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return load(directory)


def publish_gate(result, key: str) -> None:
    """Show a gate's report in the Prefect UI, then stop the flow if it failed."""
    create_markdown_artifact(markdown=result.to_markdown(), key=key, description=result.summary())
    get_run_logger().info(result.summary())
    result.raise_if_failed()


def publish_table(rows: list[dict], key: str, description: str) -> None:
    create_table_artifact(table=rows, key=key, description=description)
