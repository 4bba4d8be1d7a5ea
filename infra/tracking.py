"""MLflow setup from Settings: one tracking store, created once, and the project's experiment.

Everything here takes the Settings explicitly and returns an ``MlflowClient`` bound to them, so library code never
depends on (or changes) MLflow's process-wide tracking URI; ``configure_mlflow`` is for the fluent API in flows.
Nothing runs at import.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from towerflow.config import Settings
from towerflow.errors import TowerflowError

if TYPE_CHECKING:
    from mlflow import MlflowClient

_ready: set[str] = set()  # tracking URIs whose store this process has already created or opened
_ready_lock = threading.Lock()


class LockHeldError(TowerflowError):
    """A non-blocking file lock is held by someone else."""


@contextmanager
def file_lock(path: str | Path, *, blocking: bool = True, note: str = "") -> Iterator[Path]:
    """An exclusive ``flock`` on ``path`` (created if missing), released on exit or when the process dies.

    Non-blocking: raises ``LockHeldError`` naming what the holder wrote into the file. Each call opens its own file
    description, so two threads of one process exclude each other too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "unknown holder"
            raise LockHeldError(f"{path} is locked by {holder}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} {note}".strip().encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` or ``sqlite:///relative``), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def artifact_location(settings: Settings) -> str | None:
    """Artifacts of a local SQLite store live beside its database file, never in the current directory
    (MLflow's default, ``./mlruns``); a server chooses its own."""
    db = sqlite_path(settings.tracking_uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db else None


def ensure_store(settings: Settings) -> str:
    """Create (migrate) the tracking store once, under a file lock: several processes creating a fresh SQLite
    store at once race on its migrations. Returns the tracking URI."""
    uri = settings.tracking_uri
    with _ready_lock:
        if uri in _ready:
            return uri
        db = sqlite_path(uri)
        if db is not None:
            from mlflow import MlflowClient

            db.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(db.with_name(db.name + ".lock"), note="creating the MLflow store"):
                client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                client.search_experiments(max_results=1)  # opens the store: creates or migrates its tables
                client.search_registered_models(max_results=1)
        _ready.add(uri)
    return uri


def tracking_client(settings: Settings) -> MlflowClient:
    """A client for the tracking store and model registry named by ``settings`` (the registry is the same store)."""
    from mlflow import MlflowClient

    uri = ensure_store(settings)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_or_create_experiment(settings: Settings, client: MlflowClient | None = None) -> str:
    """Id of ``settings.experiment_name``, created (with artifacts beside a local store) if missing."""
    from mlflow.exceptions import MlflowException

    client = client or tracking_client(settings)
    exp = client.get_experiment_by_name(settings.experiment_name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(settings.experiment_name, artifact_location=artifact_location(settings))
    except MlflowException:  # another process created it between our read and our create
        exp = client.get_experiment_by_name(settings.experiment_name)
        if exp is None:
            raise
        return exp.experiment_id


def configure_mlflow(settings: Settings) -> str:
    """Point MLflow's fluent API (``mlflow.start_run`` ...) at ``settings``; returns the experiment id.

    For flows and training code that log with the fluent API; library code uses ``tracking_client``.
    """
    import mlflow

    uri = ensure_store(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id = get_or_create_experiment(settings)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
