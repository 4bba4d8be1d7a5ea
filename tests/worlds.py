"""Small worlds for the flow and serving tests: one place builds them, so every test trains on the same data.

- ``write_counted_source``: 3 users, 4 items and k click events on day k of January 2026 (k = 1..5), small enough
  to count any window's events by hand (the backfill tests).
- ``TINY_WORLD`` / ``tiny_world``: the synthetic world (4 days from 2026-01-01, 150 users, 200 items) that the
  retrain, backfill and serving tests train real releases on, with ``tiny_retrain_config`` as the model.
- ``use_data_root``: point ``Settings()`` (and so the flows and the CLI) at a data root, ignoring the caller's env.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from towerflow.config import (
    EvalConfig,
    ExamplesConfig,
    GateConfig,
    ModelConfig,
    RankerConfig,
    RankerGateConfig,
    RankerStageConfig,
    RankerTrainConfig,
    RetrainConfig,
    Settings,
    TrainConfig,
    WorldConfig,
)

AS_OF, LOOKBACK = date(2026, 1, 5), 4  # the window [Jan 1, Jan 5): all four days of TINY_WORLD
TINY_WORLD = WorldConfig(n_users=150, n_items=200, n_topics=5, days=4, events_per_day=1_500, new_items_per_day=5,
                         seed=1)


def use_data_root(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Make ``Settings()`` resolve everything under ``root``: no source, tracking URI or model name from the env."""
    mp.setenv("TOWERFLOW_DATA_ROOT", str(root))
    for name in ("TOWERFLOW_SOURCE_URI", "TOWERFLOW_MLFLOW_TRACKING_URI", "TOWERFLOW_REGISTERED_MODEL"):
        mp.delenv(name, raising=False)


def write_tiny_world(root: Path) -> None:
    """Generate ``TINY_WORLD`` as the default source of data root ``root`` (``<root>/source``)."""
    from towerflow.data.synthetic import generate_world

    generate_world(str(root / "source"), TINY_WORLD)


@contextmanager
def tiny_world(root: Path) -> Iterator[Settings]:
    """``TINY_WORLD`` at ``<root>/source`` with the env pointed at ``root`` until the block ends.

    For module- and session-scoped fixtures, which cannot use the function-scoped ``monkeypatch``.
    """
    with pytest.MonkeyPatch.context() as mp:
        use_data_root(mp, root)
        write_tiny_world(root)
        yield Settings()


# The ranking stages sized for TINY_WORLD: short sequences, one epoch, small widths; the ranker gate relaxed as the
# model gate is (a one-epoch toy ranker need not beat popularity: these tests check orchestration).
TINY_RANKER = RankerStageConfig(
    train=RankerTrainConfig(model=RankerConfig(max_seq_len=8, latest_k=2, item_dim=8, mlp_hidden=(16,),
                                               retrieval_score=True), epochs=1,
                            batch_size=256),
    gate=RankerGateConfig(min_lift_over_baselines=-1.0, max_regression=1.0))


def tiny_retrain_config(*, gates: dict | None = None, promote: bool = True, **train) -> RetrainConfig:
    """A retrain config sized for ``TINY_WORLD``: a 16-d one-layer model, batch 128, short histories.

    ``train`` overrides TrainConfig fields (epochs: 3 unless given; lr, seed); ``gates`` adds GateConfig fields to the
    one gate every such test relaxes: a toy model need not beat popularity, since these tests check orchestration.
    """
    return RetrainConfig(
        examples=ExamplesConfig(max_seq_len=8),
        train=TrainConfig(model=ModelConfig(dim=16, d_model=16, hidden=32, n_layers=1), batch_size=128,
                          **{"epochs": 3, **train}),
        eval=EvalConfig(short_history_max=3),
        gates=GateConfig(min_lift_over_popularity=-1.0, **(gates or {})),
        ranker=TINY_RANKER,
        promote=promote,
    )


def write_counted_source(root: Path) -> str:
    """A hand-countable source at ``root``: 3 users, 4 items, and k click events on day k of January 2026
    (k = 1..5), so any window's event count is a sum of day numbers. Returns its URI."""
    from towerflow.data.source import ParquetSink

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
