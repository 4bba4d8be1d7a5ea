"""The backfill flow on a tiny hand-made source: days run, a second run skips them, force reruns, failures isolate.

``tiny_source`` (conftest) holds exactly k events on day k of January 2026 (k = 1..5), so the window ``[D - 2, D)``
of day D = Jan d holds (d-2) + (d-1) events: Jan 3 -> 1 + 2 = 3, Jan 4 -> 2 + 3 = 5, Jan 5 -> 3 + 4 = 7.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from tests.worlds import tiny_retrain_config, write_tiny_world
from towerflow.backfill import BackfillError, Ledger, LedgerEntry, days_between, work_name

JAN = [date(2026, 1, d) for d in range(1, 6)]


def _ledger(data_root: Path) -> Ledger:
    return Ledger(data_root / "backfill" / "ledger.sqlite")


# --- pure bookkeeping (no Prefect) ------------------------------------------------------------------------------


def test_days_between_is_closed_and_rejects_reversed_range():
    assert days_between(JAN[2], JAN[4]) == JAN[2:5]
    assert days_between(JAN[0], JAN[0]) == [JAN[0]]
    with pytest.raises(BackfillError, match="end 2026-01-01 is before start 2026-01-03"):
        days_between(JAN[2], JAN[0])


def test_work_levels_cover_lower_levels_only(tmp_path: Path):
    assert work_name(False, False) == "extract"
    assert work_name(True, False) == "retrain"
    assert work_name(True, True) == "retrain+promote"
    with pytest.raises(BackfillError, match="promote=True needs retrain=True"):
        work_name(False, True)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.entries() == []
    ledger.record(LedgerEntry(day=JAN[0], work="retrain", lookback_days=7, finished_at=datetime.now(UTC)))
    assert ledger.done(JAN[0], "extract", 7).work == "retrain"
    assert ledger.done(JAN[0], "retrain", 7).work == "retrain"
    assert ledger.done(JAN[0], "retrain+promote", 7) is None  # promoting was never done
    assert ledger.done(JAN[0], "extract", 3) is None  # another window is other work
    assert ledger.done(JAN[1], "extract", 7) is None


# --- the flow, on the session's Prefect test harness ------------------------------------------------------------


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_harness")
def test_backfill_runs_days_then_skips_them_and_force_reruns(data_root: Path, tiny_source: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from towerflow.flows.backfill import backfill

    first = backfill(start=JAN[2], end=JAN[3], lookback_days=2, retrain=False, source_uri=tiny_source)
    assert first.ran == [JAN[2], JAN[3]] and first.skipped == [] and first.failed == []
    assert [d.events for d in first.days] == [3, 5]
    ids = [d.snapshot_id for d in first.days]
    assert ids[0].startswith("20260103-2d-") and ids[1].startswith("20260104-2d-")
    assert all((data_root / "snapshots" / i / "manifest.json").is_file() for i in ids)
    ledger = _ledger(data_root)
    assert [(e.day, e.work, e.lookback_days, e.snapshot_id) for e in ledger.entries()] == [
        (JAN[2], "extract", 2, ids[0]), (JAN[3], "extract", 2, ids[1])]
    first_done = {e.day: e.finished_at for e in ledger.entries()}

    again = backfill(start=JAN[2], end=JAN[4], lookback_days=2, retrain=False, source_uri=tiny_source)
    assert again.skipped == [JAN[2], JAN[3]] and again.ran == [JAN[4]]
    assert [d.snapshot_id for d in again.days[:2]] == ids  # skipped days report what the ledger holds
    assert again.days[2].events == 7
    assert {e.day: e.finished_at for e in ledger.entries()}[JAN[2]] == first_done[JAN[2]]

    forced = backfill(start=JAN[2], end=JAN[3], lookback_days=2, retrain=False, force=True, source_uri=tiny_source)
    assert forced.ran == [JAN[2], JAN[3]] and forced.skipped == []
    assert [d.snapshot_id for d in forced.days] == ids  # extraction is idempotent: same inputs, same snapshot
    assert all(e.finished_at > first_done[e.day] for e in ledger.entries() if e.day in first_done)
    assert len(ledger.entries()) == 3

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["backfill-summary"])))
    texts = [a.data for a in arts]
    assert any("2 ran, 0 skipped, 0 failed" in t and "forced" in t for t in texts)
    assert any("1 ran, 2 skipped, 0 failed" in t for t in texts)


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_day_does_not_stop_the_others_and_fails_the_run(data_root: Path, tiny_source: str):
    from towerflow.flows.backfill import backfill

    # lookback 1: Jan 1's window [Dec 31, Jan 1) is empty and fails; Jan 2's window [Jan 1, Jan 2) has 1 event.
    state = backfill(start=JAN[0], end=JAN[1], lookback_days=1, retrain=False, source_uri=tiny_source,
                     return_state=True)
    assert state.is_failed()
    with pytest.raises(BackfillError, match=r"1 of 2 day\(s\) failed: 2026-01-01"):
        state.result()
    [done] = _ledger(data_root).entries()
    assert (done.day, done.work) == (JAN[1], "extract")

    again = backfill(start=JAN[0], end=JAN[1], lookback_days=1, retrain=False, source_uri=tiny_source,
                     return_state=True)
    assert again.is_failed()  # the empty day fails again; the done day is not redone
    assert _ledger(data_root).entries() == [done]  # same row, same finished_at: Jan 2 was skipped


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_harness")
def test_backfill_with_retrain_promotes_through_the_retrain_subflow_once(data_root: Path):
    from towerflow.config import Settings
    from towerflow.flows.backfill import backfill
    from towerflow.infra.releases import load_release

    write_tiny_world(data_root)
    # orchestration under test, not a 2-epoch model's quality (the popularity gate is relaxed);
    # promote=False: the backfill's promote parameter, not the config's, decides
    config = tiny_retrain_config(epochs=2, promote=False)
    day = date(2026, 1, 5)  # window [Jan 1, Jan 5): the world's four days

    first = backfill(start=day, end=day, lookback_days=4, retrain=True, promote=True, config=config)
    [outcome] = first.days
    assert (outcome.status, outcome.retrain_status) == ("ran", "promoted")
    assert outcome.release_id and outcome.snapshot_id.startswith("20260105-4d-")
    assert load_release(Settings()).release_id == outcome.release_id  # the champion is the backfilled release
    [entry] = _ledger(data_root).entries()
    assert (entry.work, entry.release_id, entry.retrain_status) == ("retrain+promote", outcome.release_id, "promoted")

    # Asking for less (retrain without promote) or the same is already done: nothing is retrained.
    again = backfill(start=day, end=day, lookback_days=4, retrain=True, promote=False, config=config)
    assert again.skipped == [day] and again.days[0].release_id == outcome.release_id
    assert _ledger(data_root).entries() == [entry]


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_harness")
def test_deployment_run_no_worker_takes_gives_up_with_a_message_instead_of_waiting_forever():
    # a real deployment of the backfill flow on a pool no worker polls: the run stays Scheduled
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from towerflow.commands.backfill import _via_deployment
    from towerflow.errors import TowerflowError
    from towerflow.flows.backfill import backfill

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="nobody-polls", type="process"), overwrite=True)
        client.create_deployment(flow_id=client.create_flow(backfill), name="backfill", work_pool_name="nobody-polls",
                                 entrypoint="towerflow.flows.backfill:backfill")
    t0 = time.monotonic()
    with pytest.raises(TowerflowError, match=r"is still Scheduled after \d+s: no worker has taken it\. Start one "
                                             r"\('towerflow stack up'.*prefect flow-run cancel [0-9a-f-]{36}"):
        _via_deployment({"start": "2026-01-03", "end": "2026-01-03", "retrain": False}, start_timeout_s=1.5)
    assert time.monotonic() - t0 < 30  # gave up about 1.5 s after the run was created
