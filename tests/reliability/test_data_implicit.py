"""Implicit feedback through the real flow: a plain ``user,item,timestamp`` file is imported and retrained on with
the default data gate (no positive-rate bounds to relax), while the same rows declared as explicit actions are
still refused by the positive-rate check.

Real Prefect (test harness), real MLflow (SQLite), real GX and FAISS, on the positives of ``TINY_WORLD``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.worlds import AS_OF, LOOKBACK, TINY_WORLD, tiny_retrain_config, use_data_root
from towerflow.config import GateConfig, Settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _engagements_csv(tmp: Path, path: Path, with_action: bool) -> Path:
    """The tiny world's positive events as ``user,item,timestamp`` (plus ``action=click`` if asked)."""
    from towerflow.contract import POSITIVE_ACTIONS
    from towerflow.data.source import ParquetSource
    from towerflow.data.synthetic import generate_world

    if not (tmp / "world").exists():
        generate_world(str(tmp / "world"), TINY_WORLD)
    src = ParquetSource(str(tmp / "world"))
    start = pd.Timestamp(TINY_WORLD.start, tz="UTC")
    ev = src.read_events(start.to_pydatetime(), (start + pd.Timedelta(days=TINY_WORLD.days)).to_pydatetime())
    ev = ev[ev.action.isin(POSITIVE_ACTIONS)]
    out = pd.DataFrame({"user": ev.user_id, "item": ev.item_id, "timestamp": ev.ts.astype("int64") // 10**6})
    if with_action:
        out["action"] = "click"
    out.to_csv(path, index=False)
    return path


def test_implicit_csv_passes_the_default_data_gate_and_promotes(tmp_path, monkeypatch):
    # no capsys here: Prefect binds its console log handler to the stream of the session's first flow run, and a
    # captured stream is closed when the test ends (later flow tests would then fail on every log line)
    from towerflow.data.interactions import import_interactions
    from towerflow.flows.retrain import retrain
    from towerflow.flows.stages import StageFailed

    use_data_root(monkeypatch, tmp_path / "towerflow")
    csv = _engagements_csv(tmp_path, tmp_path / "log.csv", with_action=False)
    summary = import_interactions(str(csv), Settings().source)
    assert "feedback implicit (only positives: the data gate skips its positive-rate checks)" in str(summary)

    # A toy model on ~2k featureless engagements (every item's category "unknown") checks orchestration, not
    # quality: its item vectors sit close together (mean cosine ~0.95), so the collapse bound is relaxed like the
    # lift bound (tiny_retrain_config). The data gate's thresholds stay the defaults, checked below.
    config = tiny_retrain_config(gates={"max_release_latency_ms": 10_000, "max_mean_cosine": 0.99}, epochs=3, lr=5e-3)
    data_gate = config.gates.model_dump(include={"max_volume_drop", "max_volume_growth", "positive_rate_range",
                                                 "max_positive_rate_ratio"})
    assert data_gate == GateConfig().model_dump(include=set(data_gate))  # the data gate's thresholds are the defaults
    result = retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=config)
    assert result.status == "promoted"

    from mlflow import MlflowClient

    settings = Settings()
    gate = MlflowClient(settings.tracking_uri).download_artifacts(result.mlflow_run_id, "gates/data_gate.json",
                                                                 str(tmp_path / "artifacts"))
    checks = {c["name"]: c for c in json.loads(Path(gate).read_text())["checks"]}
    assert checks["events.positive rate"]["passed"]
    assert checks["events.positive rate"]["detail"].startswith("not applied: implicit feedback")

    # The same rows declared as explicit actions (every one a click): the positive-rate check refuses them.
    explicit = _engagements_csv(tmp_path, tmp_path / "log-actions.csv", with_action=True)
    assert import_interactions(str(explicit), str(tmp_path / "explicit")).feedback == "explicit"
    with pytest.raises(StageFailed, match=r"(?s)stage 'validate_data' failed: .*events\.positive rate.*1, allowed"):
        retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=config, source_uri=str(tmp_path / "explicit"))
