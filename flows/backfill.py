"""The backfill flow: for each day of ``[start, end]``, extract that day's snapshot and (optionally) retrain on it.

Day ``D`` means what the daily retrain would have done on ``D``: the window ``[D - lookback_days, D)``. A day
already done (see the ledger in towerflow/backfill.py) is skipped unless ``force``; one day's failure does not
stop the others, and the run ends Failed when any day failed, after publishing its summary as a markdown artifact.

    towerflow backfill --start 2026-01-08 --end 2026-01-10 --no-retrain
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_flow_run

from towerflow.backfill import (
    BackfillError,
    BackfillSummary,
    DayOutcome,
    Ledger,
    LedgerEntry,
    days_between,
    now_utc,
    work_name,
)
from towerflow.config import RetrainConfig, Settings

SUMMARY_ARTIFACT_KEY = "backfill-summary"


def _io_error(task, task_run, state) -> bool:
    """Retry only what a retry can fix (a flaky filesystem), not a contract violation or an empty window."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(name="extract", task_run_name="extract-{day}", retries=2, retry_delay_seconds=2, retry_condition_fn=_io_error)
def extract_day(source_uri: str, day: date, lookback_days: int, snapshots_dir: Path) -> dict:
    """Snapshot ``[day - lookback_days, day)``; returns the snapshot id, its path and its event count."""
    from towerflow.data.source import ParquetSource
    from towerflow.tasks.extract import extract

    snapshot = extract(ParquetSource(source_uri), day, lookback_days, snapshots_dir)
    return {"snapshot_id": snapshot.snapshot_id, "path": str(snapshot.path),
            "events": int(snapshot.manifest["rows"]["events"])}


def _run_day(day: date, *, lookback_days: int, retrain: bool, promote: bool, config: RetrainConfig,
             source_uri: str, settings: Settings, ledger: Ledger, work: str) -> DayOutcome:
    """Do one day's work and record it in the ledger; any failure becomes a ``failed`` outcome, not an exception."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = DayOutcome(day=day, status="failed")
    try:
        snap = extract_day(source_uri, day, lookback_days, settings.snapshots_dir)
        out.snapshot_id, out.events = snap["snapshot_id"], snap["events"]
        if retrain:
            # Imported here: the retrain flow pulls in torch and FAISS, which an extract-only backfill never needs.
            from towerflow.flows.retrain import retrain as retrain_flow

            cfg = config.model_copy(update={"promote": promote})
            result = retrain_flow.with_options(flow_run_name=f"retrain-{day}")(
                as_of=day, lookback_days=lookback_days, config=cfg, source_uri=source_uri)
            out.retrain_status, out.release_id = result.status, result.release_id
            if result.status == "failed":
                raise BackfillError(f"retrain as of {day} ended with status 'failed'")
        ledger.record(LedgerEntry(day=day, work=work, lookback_days=lookback_days, snapshot_id=out.snapshot_id,
                                  release_id=out.release_id, retrain_status=out.retrain_status,
                                  flow_run_id=current_flow_run.id, finished_at=now_utc()))
        out.status = "ran"
    except Exception as exc:  # noqa: BLE001 - one day's failure must not stop the others
        out.error = f"{type(exc).__name__}: {exc}"
        logger.error("day %s failed: %s", day, out.error)
    out.seconds = time.perf_counter() - t0
    return out


@flow(name="backfill", log_prints=True)
def backfill(start: date, end: date, lookback_days: int = 7, retrain: bool = True, promote: bool = False,
             force: bool = False, config: RetrainConfig = RetrainConfig(),  # noqa: B008 - pydantic, immutable use
             source_uri: str | None = None) -> BackfillSummary:
    """Rebuild every day of ``[start, end]``: extract its snapshot and, if ``retrain``, retrain (and promote when
    ``promote``). Days the ledger has as done are skipped unless ``force``."""
    logger = get_run_logger()
    settings = Settings()
    days = days_between(start, end)
    work = work_name(retrain, promote)
    source = source_uri or settings.source
    ledger = Ledger(settings.data_root / "backfill" / "ledger.sqlite")
    logger.info("backfill %s..%s: %d day(s), work %s, lookback %dd, source %s%s", start, end, len(days), work,
                lookback_days, source, ", forced" if force else "")

    outcomes: list[DayOutcome] = []
    for i, day in enumerate(days, 1):
        entry = None if force else ledger.done(day, work, lookback_days)
        if entry is not None:
            logger.info("[%d/%d] %s skipped: %s already done at %s", i, len(days), day, entry.work,
                        entry.finished_at.isoformat(timespec="seconds"))
            outcomes.append(DayOutcome(day=day, status="skipped", snapshot_id=entry.snapshot_id,
                                       release_id=entry.release_id, retrain_status=entry.retrain_status))
            continue
        logger.info("[%d/%d] %s: %s", i, len(days), day, work)
        outcome = _run_day(day, lookback_days=lookback_days, retrain=retrain, promote=promote, config=config,
                           source_uri=source, settings=settings, ledger=ledger, work=work)
        logger.info("[%d/%d] %s %s in %.1fs", i, len(days), day, outcome.status, outcome.seconds)
        outcomes.append(outcome)

    summary = BackfillSummary(start=start, end=end, work=work, lookback_days=lookback_days, force=force,
                              days=outcomes)
    create_markdown_artifact(key=SUMMARY_ARTIFACT_KEY, markdown=summary.to_markdown(),
                             description=summary.headline())
    print(summary.to_text())
    if summary.failed:
        raise BackfillError(f"{len(summary.failed)} of {len(days)} day(s) failed: "
                            + ", ".join(str(d) for d in summary.failed) + " (see the backfill-summary artifact)")
    return summary
