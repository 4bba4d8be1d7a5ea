"""Shared fixtures. Every test gets its own data root; nothing touches the network or the user's home."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config):  # runs before test modules import prefect or mlflow
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh TOWERFLOW_DATA_ROOT for one test."""
    from tests.worlds import use_data_root

    root = tmp_path / "towerflow"
    use_data_root(monkeypatch, root)
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch and one FAISS thread for the test, then the process's counts back.

    Tiny models and indexes on a shared 2-core machine run several times faster on one thread (two intra-op or
    OpenMP threads only spin against each other), and one thread is what each torchrun rank uses. Request it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import faiss
    import torch

    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_before)
    faiss.omp_set_num_threads(faiss_before)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect API (its own SQLite database) and PREFECT_HOME for every flow test of the session.

    Request it with ``pytestmark = pytest.mark.usefixtures("prefect_harness")``; tests that only call ``.fn()`` or
    pure functions should not, so they do not pay for it.
    """
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_HOME: tmp_path_factory.mktemp("prefect-home")}), \
            prefect_test_harness(server_startup_timeout=120):
        yield
