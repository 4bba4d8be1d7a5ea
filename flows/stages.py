"""Thin Prefect tasks over the pure stage functions in tasks/ and validation/.

A task here does only what the pure function must not: read and write files, log to MLflow, publish Prefect
artifacts, and turn failures into ``StageFailed`` naming the stage. Expensive stages keep their output in a
content-addressed work directory (``<data_root>/work/<stage>/<key>``) so a failed run, started again with the same
inputs, resumes from its last good stage instead of recomputing. The key of that directory (``stage_key``) also
hashes the source of the code that computes the stage, so editing a model or the example builder recomputes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import opaque

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


# The modules whose code computes each cached stage; every towerflow module they import (at module level or inside
# a function, transitively) is hashed with them. The train stage's input comes out of augment_context uncached.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "build_examples": ("towerflow.tasks.build_examples",),
    "train": ("towerflow.tasks.train", "towerflow.tasks.augment_context"),
    "train_ranker": ("towerflow.tasks.train_ranker", "towerflow.tasks.ranking_stage"),
}


def module_source(name: str) -> bytes | None:
    """The source of module ``name``, or None when ``name`` is not a module with a source file.

    Found without importing ``name`` (only the packages above it): the parent package's folders are searched.
    """
    parent, _, leaf = name.rpartition(".")
    try:
        spec = importlib.util.find_spec(parent) if parent else None
    except (ImportError, AttributeError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:  # no parent, or "pkg.mod.func": mod is not a package
        return None
    for folder in spec.submodule_search_locations:
        for path in (Path(folder) / leaf / "__init__.py", Path(folder) / f"{leaf}.py"):
            if path.is_file():
                return path.read_bytes()
    return None


def _imported(source: bytes, package: str) -> set[str]:
    """Absolute names imported anywhere in ``source`` under ``package`` (``from a import b`` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == package or n.startswith(package + ".")}


def code_digest(*roots: str, package: str = "towerflow") -> str:
    """sha256 (16 hex) of the source of ``roots`` and every ``package`` module they import, transitively.

    Deterministic (modules hashed in name order, with their names) and cheap: a few dozen small files parsed.
    """
    sources: dict[str, bytes] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        source = module_source(name)
        if source is None:
            continue
        sources[name] = source
        todo += sorted(_imported(source, package) - sources.keys())
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    return h.hexdigest()[:16]


def stage_key(stage_name: str, *parts: Any) -> str:
    """``content_key`` of a cached stage's inputs AND of the code that computes it (``STAGE_CODE``)."""
    return content_key(stage_name, code_digest(*STAGE_CODE[stage_name]), *parts)


def _is_io_error(task, task_run, state) -> bool:  # Prefect retry_condition_fn: retry I/O, never a gate
    try:
        state.result()
    except StageFailed as exc:
        return isinstance(exc.cause, OSError | TimeoutError | ConnectionError)
    except Exception:  # noqa: BLE001
        return False
    return False


class StageTask(Task):
    """A Prefect task that takes its arguments as they are, without walking into them.

    Prefect visits every element of every argument of a task call, recursively (lists, dicts, dataclasses,
    pydantic models), twice, looking for futures and states to resolve: on the stages' inputs (examples, trained
    models, evaluations) that can cost more than the stage itself (measured: 3.9 s per task for a dataclass
    holding a 200k-element list). ``opaque`` keeps the top-level link (the UI still draws which task fed which)
    and skips the walk.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wrap = {k: v if k in _CALL_OPTIONS else opaque(v) for k, v in kwargs.items()}
        return super().__call__(*(opaque(a) for a in args), **wrap)


_CALL_OPTIONS = {"return_state", "wait_for"}  # Task.__call__'s own keywords: not arguments of the stage


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
        return StageTask(fn=wrapper, **options)

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
