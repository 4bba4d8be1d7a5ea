"""One tiny world with two real releases for every serving test (the retrain flow, MLflow on SQLite, FAISS).

Version 1 (``other``) is registered but not promoted; version 2 (``champion``) is the champion, and the
refresh-user-states flow has stored its history states. Tests that move the champion put it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.worlds import AS_OF, LOOKBACK, tiny_retrain_config, tiny_world, use_data_root
from towerflow.config import RetrainConfig, Settings

HORIZON = datetime(2026, 1, 5, tzinfo=UTC)  # the end of the world's last day: the serving clock


def small_config(seed: int = 0, promote: bool = True) -> RetrainConfig:
    # these tests check serving, not quality: a 1-epoch toy model need not beat anything
    return tiny_retrain_config(gates={"max_regression": 1.0}, promote=promote, epochs=1, seed=seed)


@dataclass
class ServedWorld:
    root: Path
    settings: Settings
    champion: object  # flows.retrain.RetrainResult of the champion (version 2)
    other: object  # RetrainResult of the registered, not promoted release (version 1)
    refresh: object  # flows.refresh_user_states.RefreshResult for the champion

    def env(self, mp: pytest.MonkeyPatch) -> None:
        """Point Settings() (and so the flows and the CLI) at this world."""
        use_data_root(mp, self.root)


@pytest.fixture(scope="session")
def served(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedWorld]:
    from towerflow.flows.refresh_user_states import refresh_user_states
    from towerflow.flows.retrain import retrain

    root = tmp_path_factory.mktemp("serving") / "towerflow"
    world = ServedWorld(root, None, None, None, None)
    with tiny_world(root) as settings:
        world.settings = settings
        # registered first without promotion, so neither run is gated against a champion
        world.other = retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=small_config(seed=1, promote=False))
        world.champion = retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=small_config())
        world.refresh = refresh_user_states(incremental=False)  # every user (the retrain's own refresh ran too)
    assert (world.other.status, world.other.model_version) == ("not_promoted", "1")
    assert (world.champion.status, world.champion.model_version) == ("promoted", "2")
    yield world


@pytest.fixture(scope="session")
def world_events(served: ServedWorld):
    """The world's events (all four days) as the source holds them."""
    from datetime import timedelta

    from towerflow.data.source import ParquetSource

    return ParquetSource(served.settings.source).read_events(HORIZON - timedelta(days=7), HORIZON)


@pytest.fixture(scope="session")
def champion_release(served: ServedWorld):
    from towerflow.infra.releases import load_release

    return load_release(served.settings)


def service_for(served: ServedWorld, **config):
    """A started RetrievalService on the world (no watcher), the serving clock at the world's horizon."""
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    store = config.pop("store", None)
    svc = RetrievalService(served.settings, ServingConfig(**config), store=store)
    return svc.start(watch=False)


@pytest.fixture(scope="module")
def hybrid(served):
    """A started hybrid RetrievalService on the world, one per test module."""
    svc = service_for(served)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(hybrid):
    """The real app over ``hybrid``, through Starlette's TestClient."""
    from fastapi.testclient import TestClient

    from towerflow.serving.app import create_app

    with TestClient(create_app(service=hybrid)) as c:
        yield c
