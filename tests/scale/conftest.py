"""Scale-out test fixtures: a Prefect test harness for the Dask flow tests (entering it costs ~18 s, so it is
session-scoped and requested only by tests that run a flow)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect API (its own SQLite database) and PREFECT_HOME; Dask workers get it through the task
    run context that prefect-dask ships with every task."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_HOME: tmp_path_factory.mktemp("prefect-home")}), \
            prefect_test_harness(server_startup_timeout=120):
        yield
