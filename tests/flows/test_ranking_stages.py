"""The retrain's ranking stages as Prefect tasks: skipped (with a log line and an MLflow tag) when the snapshot holds
no negatives (impression, skip or hide rows) or the stages are off, and a failing ranker gate stops the flow naming the stage.

The full chain on a world with impressions runs in test_retrain.py (the champion fixture)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from prefect import flow

from towerflow.config import RetrainConfig
from towerflow.contract import conform
from towerflow.flows import retrain_tasks as t
from towerflow.tasks.vocabulary import Vocab

pytestmark = pytest.mark.usefixtures("prefect_harness")


class Snapshot:
    """What the ranking stages read of a snapshot."""

    snapshot_id = "snap-test"
    window = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC))

    def __init__(self, actions: list[str], day: str = "2026-01-01") -> None:
        df = pd.DataFrame({"event_id": [f"e{i}" for i in range(len(actions))], "user_id": 1, "item_id": 10,
                           "action": actions, "surface": "homefeed", "context_item_id": None, "query": None,
                           "ts": pd.Timestamp(day, tz="UTC") + pd.to_timedelta(np.arange(len(actions)), unit="h")})
        self._events = conform(df, "events")

    def events(self) -> pd.DataFrame:
        return self._events


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> t.Tracking:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("ranking-stages"))
    return t.Tracking(run.info.run_id, uri)


@flow(name="test-ranking-stages")
def ranking_stages(snapshot, config: RetrainConfig, tracking: t.Tracking):
    from towerflow.config import Settings

    settings = Settings()
    examples = SimpleNamespace(vocab=Vocab(item_ids=np.array([10]), user_ids=np.array([1]), categories=["c"],
                                           genres=[], demographic_fields=[], demographic_values=[]))
    data = t.build_ranking_examples(settings, snapshot, examples, config, tracking)
    model = t.train_ranker(settings, data, None, config.ranker, tracking)
    ev = t.evaluate_ranker(settings, snapshot, data, model, examples, None, config, tracking)
    t.gate_ranker(ev, config.ranker, tracking)
    return data, model, ev


def _tags(tracking: t.Tracking) -> dict[str, str]:
    return tracking.client().get_run(tracking.run_id).data.tags


def test_a_snapshot_without_negatives_skips_the_ranking_stages(data_root, tracking):
    assert ranking_stages(Snapshot(["click", "save", "click"]), RetrainConfig(), tracking) == (None, None, None)
    assert _tags(tracking)["towerflow.ranker"] == "skipped: no negatives"


def test_a_window_with_requests_only_in_its_held_out_days_skips_the_ranking_stages(data_root, tracking):
    # every request is on the window's last day, which ranker.holdout_days (1) holds out: nothing is left to train
    # on (a 1-day retrain). The retriever's release goes on without a ranker instead of failing in train_ranker.
    snapshot = Snapshot(["impression", "click", "impression", "skip"], day="2026-01-02")
    assert ranking_stages(snapshot, RetrainConfig(), tracking) == (None, None, None)
    assert _tags(tracking)["towerflow.ranker"] == "skipped: no training requests"


def test_ranking_stages_off_leave_the_release_without_a_ranker(data_root, tracking):
    config = RetrainConfig(ranker={"enabled": False})
    assert ranking_stages(Snapshot(["impression", "click"]), config, tracking) == (None, None, None)
    assert _tags(tracking)["towerflow.ranker"] == "disabled"


def test_a_failing_ranker_gate_stops_the_flow_naming_the_stage(data_root, tracking):
    from towerflow.flows.stages import StageFailed
    from towerflow.tasks.ranking_stage import RankerEvaluation

    @flow(name="test-ranker-gate")
    def gate_only(ev):
        t.gate_ranker(ev, RetrainConfig().ranker, tracking)

    ev = RankerEvaluation(candidate={"auc/mean": 0.40}, baselines={"popularity": {"auc/mean": 0.60}}, n_rows=300,
                          n_requests=100)
    with pytest.raises(StageFailed, match=r"(?s)stage 'gate_ranker' failed: .*vs_popularity: candidate 0\.4000 vs "
                                          r"popularity 0\.6000"):
        gate_only(ev)
    assert _tags(tracking)["towerflow.gate.ranker"] == "False"


def test_retrain_ranker_builds_sequences_with_the_history_window_serving_applies():
    # Serving builds a ranker-only release's sequences with its base's examples.max_history_days (the config.json the
    # release loads with); the retrain-ranker flow's own config may say otherwise and must not win.
    config = RetrainConfig(examples={"max_history_days": 365})
    base = t.RankerBase(manifest=None, version=1, vocab=None, embeddings=None, champion=None, max_history_days=30)
    assert t._history_days(base, config) == 30
    assert t._history_days(SimpleNamespace(vocab=None), config) == 365  # the retrain flow: its own release's config
