"""Promotion and user-state refresh as one pipeline: after the retrain flow promotes, the user-state store holds the
new champion's states; a run that does not promote writes none; a refresh that fails leaves the promotion standing.

Real Prefect (the session harness), real MLflow (SQLite), the TINY_WORLD of tests/worlds.py. Only the first run
trains; every later run has the same data and train config, so it reuses the model from the work directory and
costs evaluation, index, release gate and promotion only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import pytest

from tests.worlds import AS_OF, LOOKBACK, tiny_retrain_config, tiny_world
from towerflow.config import RetrainConfig, Settings

pytestmark = pytest.mark.usefixtures("prefect_harness")

HORIZON = datetime(2026, 1, 5, tzinfo=UTC)  # the end of the world's last day: where the refresh measures from
# TINY_WORLD's 6,000 events (4 days x 1,500) come from 126 of its 150 users; 123 of those have an action other
# than an impression, every one on an item the release knows (all 220 items were created before AS_OF). The
# refresh's 7-day window ending at HORIZON holds all four days, so 123 users get a state.
ACTIVE_USERS = 123


def config(promote: bool = True, refresh_user_states: bool = True) -> RetrainConfig:
    # orchestration, not quality: a 1-epoch toy model; latency is the release gate's unit tests' business
    base = tiny_retrain_config(gates={"max_release_latency_ms": 10_000}, promote=promote, epochs=1)
    return base.model_copy(update={"refresh_user_states": refresh_user_states})


class Run(NamedTuple):
    result: object  # flows.retrain.RetrainResult
    subflows: list[tuple[str, str]]  # (flow name, final state type) of each subflow run, as the Prefect API has it


def run_retrain(config: RetrainConfig) -> Run:
    from towerflow.flows.retrain import retrain

    state = retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=config, return_state=True)
    assert state.is_completed(), state
    return Run(state.result(), _subflows(state.state_details.flow_run_id))


def _subflows(flow_run_id) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        return [(client.read_flow(r.flow_id).name, r.state.type.value) for r in runs]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    with tiny_world(tmp_path_factory.mktemp("refresh-after-promote") / "towerflow") as settings:
        yield settings


@pytest.fixture(scope="module")
def held_back(world: Settings) -> Run:
    """A run that passes every gate but is told not to promote (it trains the model the later runs reuse)."""
    return run_retrain(config(promote=False))


@pytest.fixture(scope="module")
def promoted(world: Settings, held_back: Run) -> Run:
    return run_retrain(config())


def stored(settings: Settings) -> dict[str, int]:
    """release id -> states held in the store ({} when no state was ever written)."""
    from towerflow.serving.state_store import SQLiteUserStateStore

    if not settings.user_states_path.exists():
        return {}
    store = SQLiteUserStateStore(settings.user_states_path)
    try:
        return store.releases()
    finally:
        store.close()


def _champion(settings: Settings) -> str:
    from towerflow.infra.releases import load_release

    return load_release(settings).release_id


def _tags(settings: Settings, run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient(settings.tracking_uri).get_run(run_id).data.tags


def test_a_run_that_does_not_promote_stores_no_states(world: Settings, held_back: Run):
    r = held_back.result
    assert r.status == "not_promoted" and held_back.subflows == []
    assert (r.user_states, r.user_states_error) == (None, None)
    assert stored(world) == {}
    assert "towerflow.user_states" not in _tags(world, r.mlflow_run_id)


def test_promotion_stores_the_new_champions_states(world: Settings, promoted: Run):
    from towerflow.data.source import ParquetSource
    from towerflow.serving.state_store import SQLiteUserStateStore
    from towerflow.tasks.build_examples import Vocab

    r = promoted.result
    assert r.status == "promoted" and _champion(world) == r.release_id
    assert promoted.subflows == [("refresh-user-states", "COMPLETED")]
    # the users expected, counted from the source independently of the flow
    vocab = Vocab.from_json((world.releases_dir / r.release_id / "vocab" / "vocab.json").read_text())
    events = ParquetSource(world.source).read_events(HORIZON - timedelta(days=7), HORIZON)
    acted = events[(events["action"] != "impression") & events["item_id"].isin(vocab.item_ids)]
    users = sorted(int(u) for u in acted["user_id"].unique())
    assert len(users) == ACTIVE_USERS

    assert stored(world) == {r.release_id: ACTIVE_USERS}  # the new champion's, and nothing else
    store = SQLiteUserStateStore(world.user_states_path)
    try:
        states = store.get(users, r.release_id)
    finally:
        store.close()
    assert sorted(states) == users
    assert {s.release_id for s in states.values()} == {r.release_id}
    assert {s.as_of for s in states.values()} == {HORIZON}

    refresh = r.user_states
    assert (refresh.release_id, refresh.version, refresh.n_users, refresh.as_of) == (
        r.release_id, 2, ACTIVE_USERS, HORIZON)
    assert r.user_states_error is None
    assert _tags(world, r.mlflow_run_id)["towerflow.user_states"] == str(ACTIVE_USERS)


def test_a_failed_gate_stores_no_states(world: Settings, promoted: Run):
    from towerflow.flows.retrain import retrain
    from towerflow.flows.stages import StageFailed

    # the same model, but a lift over popularity no recall can reach: the model gate stops the run
    base = config()
    unreachable = base.model_copy(update={"gates": base.gates.model_copy(update={"min_lift_over_popularity": 1.0})})
    with pytest.raises(StageFailed, match=r"stage 'gate_model' failed"):
        retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=unreachable)
    assert _champion(world) == promoted.result.release_id
    assert stored(world) == {promoted.result.release_id: ACTIVE_USERS}


def test_refresh_user_states_off_promotes_without_storing_states(world: Settings, promoted: Run):
    run = run_retrain(config(refresh_user_states=False))
    r = run.result
    assert r.status == "promoted" and _champion(world) == r.release_id != promoted.result.release_id
    assert run.subflows == []
    assert (r.user_states, r.user_states_error) == (None, None)
    assert stored(world) == {promoted.result.release_id: ACTIVE_USERS}
    assert "towerflow.user_states" not in _tags(world, r.mlflow_run_id)


def test_a_failed_refresh_leaves_the_promotion_standing(world: Settings, promoted: Run):
    from mlflow import MlflowClient

    # a directory where the store's SQLite file should be: the refresh computes the states, then cannot write them
    path = world.user_states_path
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    path.mkdir()
    try:
        run = run_retrain(config())  # the retrain run itself ends Completed
    finally:
        path.rmdir()
        aside.rename(path)

    r = run.result
    assert run.subflows == [("refresh-user-states", "FAILED")]
    assert r.status == "promoted" and r.release_id != promoted.result.release_id
    assert _champion(world) == r.release_id  # champion, tower and index together: nothing undone
    assert r.user_states is None
    assert r.user_states_error.startswith(
        "stage 'refresh_user_states' failed: stage 'write_states' failed: user-state store ")
    run_info = MlflowClient(world.tracking_uri).get_run(r.mlflow_run_id)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["towerflow.user_states"] == "failed"
    assert run_info.data.tags["towerflow.user_states_error"] == r.user_states_error
    # no state of the new champion anywhere: serving answers its users on the online path until the next refresh
    assert stored(world) == {promoted.result.release_id: ACTIVE_USERS}


def test_the_cli_flag_turns_the_refresh_off():
    from towerflow.cli import build_parser
    from towerflow.commands.retrain import load_config

    args = build_parser().parse_args(["retrain", "--no-refresh-states"])
    assert args.no_refresh_states and not build_parser().parse_args(["retrain"]).no_refresh_states
    assert load_config(None).refresh_user_states is True
    assert load_config(None, refresh_states=False).refresh_user_states is False
