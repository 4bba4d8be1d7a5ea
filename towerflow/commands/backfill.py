"""``towerflow backfill``: rebuild a range of days, here (flows/backfill.py) or through the ``backfill`` deployment."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date

from towerflow.commands.common import add_source_option, prefect_api

DEPLOYMENT = "backfill/backfill"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backfill", help="extract (and retrain, promote) every day of a date range; days already done are skipped",
        description="Day D rebuilds what the daily retrain would have built on D: the window "
                    "[D - lookback_days, D). Runs here on Prefect's ephemeral API (or PREFECT_API_URL), or with "
                    "--deployment as a run of the 'backfill' deployment on the stack's worker.",
    )
    p.add_argument("--start", required=True, type=date.fromisoformat, help="first day, YYYY-MM-DD")
    p.add_argument("--end", required=True, type=date.fromisoformat, help="last day (included), YYYY-MM-DD")
    p.add_argument("--lookback-days", type=int, default=7, help="window length in days (default 7)")
    p.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain on each day's snapshot (default: yes)")
    p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=False,
                   help="promote each day's model if it passes the gates (default: no)")
    p.add_argument("--force", action="store_true", help="redo days the ledger has as done")
    p.add_argument("--config", help="RetrainConfig as YAML or JSON")
    add_source_option(p)
    p.add_argument("--deployment", action="store_true",
                   help=f"trigger the '{DEPLOYMENT}' deployment (needs PREFECT_API_URL) and wait for it")
    p.add_argument("--start-timeout-s", type=float, default=600.0,
                   help="with --deployment: give up (exit 1, the run stays scheduled) when no worker has taken the "
                        "run after this many seconds (default 600)")
    p.add_argument("--timeout-s", type=float, default=86_400.0,
                   help="with --deployment: stop following (exit 1, the run goes on) after this many seconds "
                        "(default 86400, a day)")
    p.set_defaults(handler=_backfill)


def _backfill(args: argparse.Namespace) -> int:
    from towerflow.backfill import work_name
    from towerflow.config import RetrainConfig, Settings

    work_name(args.retrain, args.promote)  # fail fast on --promote --no-retrain, before any Prefect start-up
    settings = Settings()
    config = RetrainConfig.from_file(args.config) if args.config else None
    params = {"start": args.start, "end": args.end, "lookback_days": args.lookback_days, "retrain": args.retrain,
              "promote": args.promote, "force": args.force}
    if args.source:
        params["source_uri"] = args.source
    with prefect_api(settings):
        if args.deployment:
            if config is not None:
                params["config"] = config.model_dump(mode="json")
            return _via_deployment({k: v.isoformat() if isinstance(v, date) else v for k, v in params.items()},
                                   args.start_timeout_s, args.timeout_s)
        from towerflow.flows.backfill import backfill

        summary = backfill(**params, **({"config": config} if config is not None else {}))
        print(summary.to_text())
        return 0


def _via_deployment(params: dict, start_timeout_s: float = 600.0, timeout_s: float = 86_400.0) -> int:
    """Create a run of the backfill deployment, follow its state, print its summary artifact.

    Unattended callers must not wait forever: TowerflowError when no worker has taken the run (still scheduled)
    after ``start_timeout_s``, or when it has not finished after ``timeout_s``; each message says what to do."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from towerflow.errors import TowerflowError

    if not PREFECT_API_URL.value():
        raise TowerflowError("--deployment needs a Prefect server: run 'towerflow stack up', export the "
                             "PREFECT_API_URL it prints and 'prefect deploy --name backfill'")
    run = run_deployment(DEPLOYMENT, parameters=params, timeout=0, as_subflow=False)
    ui = PREFECT_UI_URL.value()
    print(f"flow run {run.name} ({run.id}) created" + (f": {ui}/runs/flow-run/{run.id}" if ui else ""))
    last, taken = None, False
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run.id).state
            if state is not None and state.name != last:
                last = state.name
                print(f"  {time.strftime('%H:%M:%S')} {state.name}", file=sys.stderr, flush=True)
            if state is not None and state.type.value in FINAL:
                break
            # only a run no worker has touched: AwaitingConcurrencySlot (another backfill holds the deployment's
            # one slot) and AwaitingRetry are SCHEDULED too, but a worker has them
            taken = taken or (state is not None and state.name not in ("Scheduled", "Late"))
            waited = time.monotonic() - t0
            if not taken and waited > start_timeout_s:
                raise TowerflowError(
                    f"flow run {run.name} ({run.id}) is still {last or 'unscheduled'} after {waited:.0f}s: no worker "
                    f"has taken it. Start one ('towerflow stack up' runs a worker on the deployment's pool) or "
                    f"raise --start-timeout-s; the run stays scheduled until a worker takes it or you cancel it "
                    f"('prefect flow-run cancel {run.id}')")
            if waited > timeout_s:
                raise TowerflowError(f"stopped following flow run {run.name} ({run.id}) after {waited:.0f}s, still "
                                     f"{last}: it goes on; follow it in the Prefect UI or raise --timeout-s")
            time.sleep(min(2.0, max(0.1, min(start_timeout_s, timeout_s) / 10)))
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["backfill-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    if arts:
        print(arts[0].data)
    print(f"backfill run {run.name} finished {state.name}")
    return 0 if state.type.value == "COMPLETED" else 1
