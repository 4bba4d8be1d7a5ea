"""The retrain flow end to end on a tiny world: real Prefect (test harness), real MLflow (SQLite), real FAISS.

One module-scoped data root holds a promoted champion; later tests try to replace it with bad data or a worse
model and prove it keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.worlds import AS_OF, LOOKBACK, tiny_retrain_config, tiny_world
from towerflow.config import RetrainConfig, Settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


def small_config(**train) -> RetrainConfig:
    # the e2e test checks orchestration, not quality: a 3-epoch toy model need not beat popularity
    # latency is the release gate's unit tests' business; a busy CI box must not fail this one on a p99 spike
    return tiny_retrain_config(gates={"max_release_latency_ms": 10_000}, **{"epochs": 3, "lr": 5e-3, **train})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    with tiny_world(tmp_path_factory.mktemp("retrain") / "towerflow") as settings:
        yield settings


@pytest.fixture(scope="module")
def champion(world: Settings):
    from towerflow.flows.retrain import retrain

    return retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=small_config())


def _champion_release(settings: Settings) -> str:
    from towerflow.infra.releases import load_release

    return load_release(settings).release_id


def test_promotes_one_release_whose_tower_and_index_share_its_id(world: Settings, champion):
    assert champion.status == "promoted"
    release_dir = world.releases_dir / champion.release_id
    manifest = json.loads((release_dir / "release.json").read_text())
    assert manifest["release_id"] == champion.release_id
    assert json.loads((release_dir / "user_tower.json").read_text())["release_id"] == champion.release_id
    assert json.loads((release_dir / "index.json").read_text())["release_id"] == champion.release_id
    assert json.loads((release_dir / "item_embeddings.json").read_text())["release_id"] == champion.release_id
    assert _champion_release(world) == champion.release_id

    from mlflow import MlflowClient

    run = MlflowClient(world.tracking_uri).get_run(champion.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["towerflow.release_id"] == champion.release_id
    assert run.data.tags["towerflow.snapshot_id"] == champion.snapshot_id
    assert "holdout.recall_at_10" in run.data.metrics and "loss" in run.data.metrics
    assert run.data.params["train.epochs"] == "3"
    # the tiny world's split is time: the release is the refit on train + validation for the best epoch count
    assert run.data.params["train.refit"] == "auto" and run.data.tags["towerflow.best_epoch"] != "0"
    assert run.data.tags["towerflow.refit_epochs"] == run.data.tags["towerflow.best_epoch"]
    assert run.data.metrics["refit_epochs"] == int(run.data.tags["towerflow.best_epoch"])
    assert "refit.loss" in run.data.metrics
    assert 0.0 <= champion.metrics["recall@10"] <= 1.0
    assert {"candidate", "popularity", "cooccurrence"} <= set(champion.comparison)

    # the ranking stages ran on the same snapshot and the ranker ships in the release, bound to its item table
    from towerflow.infra.releases import load_release

    sidecar = json.loads((release_dir / "ranker.json").read_text())
    assert sidecar["release_id"] == champion.release_id and "auc/mean" in sidecar["metrics"]
    served = load_release(world)
    assert served.ranker is not None and served.ranker.cfg.max_seq_len == 8
    assert (served.ranker.item_vectors[1:].numpy() == served.item_vectors).all()
    assert run.data.tags["towerflow.gate.ranker"] == "True"
    for model in ("candidate", "popularity", "profile_dot"):
        assert 0.0 <= run.data.metrics[f"ranker.{model}.auc/mean"] <= 1.0
    assert {"ranker.loss", "ranker.valid.auc/mean", "ranker.candidate.hit_at_3/click",
            "ranker.candidate.gauc/save"} <= set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient(world.tracking_uri).list_artifacts(run.info.run_id, "plots")}
    assert "plots/ranker_heads.png" in artifacts


def test_bad_data_stops_before_promotion_and_champion_keeps_serving(world: Settings, champion, tmp_path):
    from towerflow.data.source import ParquetSink, ParquetSource
    from towerflow.flows.retrain import retrain
    from towerflow.flows.stages import StageFailed

    # a copy of the source whose last day has an action outside the contract's set
    src, bad = ParquetSource(world.source), tmp_path / "bad-source"
    sink = ParquetSink(str(bad))
    sink.write_users(src.read_users())
    sink.write_items(src.read_items())
    for day in src.days():
        start = pd.Timestamp(day, tz="UTC")
        events = src.read_events(start.to_pydatetime(), (start + pd.Timedelta(days=1)).to_pydatetime())
        if day == src.days()[-1]:
            events.loc[events.index[:3], "action"] = "like"
        sink.write_events_day(day, events)

    with pytest.raises(StageFailed, match=r"(?s)stage 'validate_data' failed: .*action.*3 of .* e\.g\. \['like'\]"):
        retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=small_config(), source_uri=str(bad))
    assert _champion_release(world) == champion.release_id


def test_worse_model_than_champion_is_not_promoted(world: Settings, champion):
    from towerflow.flows.retrain import retrain
    from towerflow.flows.stages import StageFailed

    # one epoch at a learning rate that cannot move the weights: far below the champion on the same holdout
    with pytest.raises(StageFailed, match=r"(?s)stage 'gate_model' failed: .*recall@10 vs champion"):
        retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=small_config(epochs=1, lr=1e-7))
    assert _champion_release(world) == champion.release_id


def test_killed_after_training_resumes_without_retraining(world: Settings, champion, tmp_path):
    """SIGKILL a real retrain process once its training output is published; the rerun reuses it."""
    from towerflow.flows.retrain import retrain

    config = small_config(seed=7)  # a new train key: this run trains from scratch
    # another seed on a tiny holdout may land a little below the champion; this test is about resuming
    config = config.model_copy(update={"gates": config.gates.model_copy(update={"max_regression": 1.0})})
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    train_dir = world.work_dir / "train"
    before = set(train_dir.iterdir())
    env = {**os.environ, "TOWERFLOW_DATA_ROOT": str(world.data_root), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": "", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "towerflow.cli", "retrain", "--as-of", AS_OF.isoformat(),
         "--lookback-days", str(LOOKBACK), "--config", str(config_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2],
        start_new_session=True)  # its own process group: the kill takes its ephemeral Prefect server down too
    try:
        deadline = time.monotonic() + 420
        done: list[Path] = []
        while not done and time.monotonic() < deadline and proc.poll() is None:
            done = [d for d in set(train_dir.iterdir()) - before if (d / "_SUCCESS").exists()]
            time.sleep(0.05)
        assert done, "the subprocess never finished training"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    trained = done[0]
    stamp = (trained / "train.json").stat().st_mtime_ns
    assert _champion_release(world) == champion.release_id  # killed before promotion: champion untouched

    result = retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=config)
    assert (trained / "train.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert result.status == "promoted"
    assert _champion_release(world) == result.release_id != champion.release_id
    # the champion had a ranker: the new one was judged against it on the same held-out rows
    from mlflow import MlflowClient

    metrics = MlflowClient(world.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    assert 0.0 <= metrics["ranker.champion.auc/mean"] <= 1.0 and "ranker.candidate_shared.auc/mean" in metrics


def test_retrain_ranker_promotes_a_ranker_only_release_over_the_champions_retriever(world: Settings, champion):
    """The retrain-ranker flow: a new ranker against the champion's retriever, released by reference, gated against
    the champion's ranker; rollback restores the previous release's ranker with its retriever."""
    from towerflow.flows.retrain_ranker import retrain_ranker
    from towerflow.infra.promote import rollback
    from towerflow.infra.releases import load_release

    before = load_release(world)
    config = small_config()
    config = config.model_copy(update={"ranker": config.ranker.model_copy(update={
        "train": config.ranker.train.model_copy(update={"seed": 5})})})
    result = retrain_ranker(as_of=AS_OF, lookback_days=LOOKBACK, config=config)
    assert result.status == "promoted" and result.previous_champion == before.release_id
    # serving's bundle loads it: the refresh-user-states subflow stored states under the new release id
    assert result.user_states_error is None and result.user_states.release_id == result.release_id
    path = world.releases_dir / result.release_id
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "ranker", "ranker.json", "release.json"]
    base_id = (before.manifest.base or {}).get("release_id", before.release_id)
    assert json.loads((path / "release.json").read_text())["base_release"]["release_id"] == base_id
    served = load_release(world)
    assert served.release_id == result.release_id and served.ranker is not None
    assert (served.item_ids == before.item_ids).all() and served.vocab_dir.parent.name == base_id
    assert 0.0 <= result.comparison[f"champion {before.release_id}"]["auc/mean"] <= 1.0  # judged against it
    rollback(world)
    back = load_release(world)
    assert back.release_id == before.release_id
    assert back.ranker.state_dict().keys() == before.ranker.state_dict().keys()
    assert all((back.ranker.state_dict()[k] == v).all() for k, v in before.ranker.state_dict().items())


def test_the_cli_retrains_the_ranker_alone(world: Settings, champion, tmp_path):
    """``towerflow retrain --ranker-only`` runs the retrain-ranker flow: the champion becomes a ranker-only release
    over the same retriever (run in process: the module's Prefect harness is the API)."""
    from towerflow.cli import main
    from towerflow.infra.promote import promote
    from towerflow.infra.releases import load_release

    before = load_release(world)
    config_file = tmp_path / "config.json"
    config_file.write_text(small_config().model_dump_json())
    try:
        assert main(["retrain", "--ranker-only", "--as-of", AS_OF.isoformat(), "--lookback-days", str(LOOKBACK),
                     "--config", str(config_file)]) == 0
        after = load_release(world)
        assert after.release_id != before.release_id and after.manifest.base is not None
        assert (after.item_ids == before.item_ids).all() and after.ranker is not None
    finally:
        promote(before.version, world)  # leave the module's champion as the other tests expect it


def test_retrain_ranker_refuses_to_promote_when_another_release_was_promoted_while_it_trained(world: Settings,
                                                                                               champion):
    """The retrain-ranker stages bind to the champion they start from and promote only if it is still champion: a
    release promoted meanwhile (another retrain) is not silently replaced by a ranker-only release serving the
    older retriever. The stages run as the flow chains them, with the other promotion between binding and promote."""
    from prefect import flow

    from towerflow.flows import retrain_tasks as t
    from towerflow.flows.retrain import validated_snapshot, window_end
    from towerflow.flows.stages import StageFailed
    from towerflow.infra.promote import list_releases, promote
    from towerflow.infra.releases import load_release

    config = small_config()
    bound_to = load_release(world)
    other = next(r.version for r in list_releases(world) if r.version != bound_to.version)

    @flow(name="test-retrain-ranker-race")
    def racing():
        end = window_end(AS_OF)
        run = t.start_tracking(world, end, LOOKBACK, config)
        snapshot = validated_snapshot(world, None, end, LOOKBACK, config, run)
        base = t.champion_retriever(world, run)
        promote(other, world)  # another retrain's promotion lands while this ranker trains
        ranking = t.build_ranking_examples(world, snapshot, base, config, run)
        ranker = t.train_ranker(world, ranking, base.embeddings, config.ranker, run)
        ranker_eval = t.evaluate_ranker(world, snapshot, ranking, ranker, base, base.embeddings, config, run)
        release = t.assemble_ranker_release(world, snapshot, base, ranker, ranker_eval, config, run)
        return t.promote_ranker(world, release, ranker_eval, run, config.promote, config.promotion)

    try:
        with pytest.raises(StageFailed, match=rf"stage 'promote_ranker' failed: .*version {other}, not the "
                                              rf"expected {bound_to.version}"):
            racing()
        assert load_release(world).version == other  # the other promotion stands
    finally:
        promote(bound_to.version, world)  # leave the module's champion as the other tests expect it
