"""Flow-test fixtures (the session-wide Prefect test harness, ``prefect_harness``, is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worlds import write_counted_source


@pytest.fixture
def tiny_source(data_root: Path) -> str:
    """``write_counted_source`` at ``<data_root>/source``: k click events on day k of January 2026 (k = 1..5)."""
    return write_counted_source(data_root / "source")
