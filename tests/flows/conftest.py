"""Flow-test fixtures (the session-wide Prefect test harness, ``prefect_harness``, is in tests/conftest.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from towerflow.data.source import ParquetSink


@pytest.fixture
def tiny_source(data_root: Path) -> str:
    """A hand-countable source at ``<data_root>/source``: 3 users, 4 items, and k click events on day k of
    January 2026 (k = 1..5), so any window's event count is a sum of day numbers."""
    root = data_root / "source"
    sink = ParquetSink(str(root))
    t0 = datetime(2025, 12, 1, tzinfo=UTC)
    sink.write_users(pd.DataFrame({"user_id": [1, 2, 3], "signup_ts": [t0] * 3, "country": ["fr", "us", "jp"]}))
    sink.write_items(pd.DataFrame({"item_id": [10, 11, 12, 13], "category": ["a", "a", "b", "b"],
                                   "genres": [None] * 4, "title": ["w", "x", "y", "z"], "created_ts": [t0] * 4}))
    for k in range(1, 6):
        noon = datetime(2026, 1, k, 12, tzinfo=UTC)
        sink.write_events_day(date(2026, 1, k), pd.DataFrame({
            "event_id": [f"e{k}-{j}" for j in range(k)],
            "user_id": [1 + j % 3 for j in range(k)],
            "item_id": [10 + j % 4 for j in range(k)],
            "action": ["click"] * k,
            "ts": [noon + timedelta(minutes=j) for j in range(k)],
            "surface": ["homefeed"] * k,
            "context_item_id": [None] * k,
            "query": [None] * k,
        }))
    return str(root)
