"""``towerflow retrain``: run the retrain flow here (Prefect's ephemeral API, or PREFECT_API_URL when set)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, date, datetime, timedelta

from towerflow.commands.common import add_source_option, positive_int, prefect_api, seconds


def _lookback(text: str) -> int | str:
    """A positive number of days, or ``all`` (from the source's first day)."""
    if text == "all":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"expected a number of days (at least 1) or 'all': {e}") from None


def default_window(days: list[date], as_of: date | None, lookback: int | str,
                   today: date | None = None) -> tuple[date, int]:
    """The window ``towerflow retrain`` trains on, given the source's day partitions.

    ``as_of`` None: the source's horizon, the day after its last day, or today when that is earlier (in production
    the last partition is today's; for imported or replayed data it is where the data ends, the serving clock).
    ``lookback`` ``all``: back to the source's first day.
    """
    today = today or datetime.now(UTC).date()
    end = as_of or (min(today, max(days) + timedelta(days=1)) if days else today)
    if lookback != "all":
        return end, int(lookback)
    return end, max(1, (end - min(days)).days) if days else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain", help="extract, validate, train, gate and promote one release",
        description="Retrain on the window [as_of - lookback_days, as_of): extract -> validate_data -> "
                    "build_examples -> augment_context -> train -> evaluate -> gate_model -> embed_items -> "
                    "build_index -> build_ranking_examples -> train_ranker -> evaluate_ranker -> gate_ranker -> "
                    "assemble_release -> gate_release -> promote. With --ranker-only, only the ranking stages, "
                    "against the champion's retriever. Exits 1 naming the stage when a stage or gate fails; the "
                    "champion release is then untouched. A rerun with the same inputs resumes after the last "
                    "finished stage.",
    )
    p.add_argument("--as-of", type=date.fromisoformat,
                   help="end of the window (exclusive), YYYY-MM-DD; default: the source's horizon (today, or the day "
                        "after the last event of imported or replayed data)")
    p.add_argument("--lookback-days", type=_lookback, default=7,
                   help="window length in days, or 'all' for everything in the source (default 7)")
    p.add_argument("--config", help="RetrainConfig as YAML or JSON (see towerflow/config.py)")
    add_source_option(p)
    p.add_argument("--epochs", type=positive_int, help="override train.epochs (at least 1)")
    p.add_argument("--no-refit", action="store_true",
                   help="train.refit false: release the early-stopped model, without the refit on train + validation "
                        "(about half the training time; make demo uses it)")
    p.add_argument("--no-promote", action="store_true", help="register the release but leave the champion as is")
    p.add_argument("--no-refresh-states", action="store_true",
                   help="after a promotion, leave the new champion's user states to the hourly refresh")
    p.add_argument("--promote-wait-s", type=seconds, metavar="S",
                   help="wait up to S seconds for another promotion's lease, logging its holder, then fail naming "
                        "it (overrides promotion.wait_s, default 300; a crashed holder frees the lease at once on "
                        "this host, after promotion.lease_s = 60 s elsewhere)")
    p.add_argument("--ranker-only", action="store_true",
                   help="retrain only the champion's ranker (the retrain-ranker flow, scheduled every 6 hours by "
                        "its deployment): a ranker-only release serving the champion's retriever by reference, "
                        "gated against the champion's ranker; status no_ranker when the window has nothing to "
                        "train one on")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_retrain)


def load_config(path: str | None, epochs: int | None = None, promote: bool = True, refresh_states: bool = True,
                promote_wait_s: float | None = None, refit: bool = True):
    """The RetrainConfig of ``path`` (defaults without one) with the command line's overrides, validated whole
    (``model_copy(update=...)`` would skip validation: ``epochs=-2`` would pass)."""
    from towerflow.config import RetrainConfig, validate_config

    data = (RetrainConfig.from_file(path) if path else RetrainConfig()).model_dump()
    if promote_wait_s is not None:
        data["promotion"]["wait_s"] = promote_wait_s
    if epochs is not None:
        data["train"]["epochs"] = epochs
    if not refit:
        data["train"]["refit"] = False
    if not promote:
        data["promote"] = False
    if not refresh_states:
        data["refresh_user_states"] = False
    return validate_config(RetrainConfig, data, f"{path or 'defaults'} with command-line overrides")


def _retrain(args: argparse.Namespace) -> int:
    from towerflow.config import Settings
    from towerflow.flows.retrain import retrain
    from towerflow.flows.retrain_ranker import retrain_ranker
    from towerflow.report import print_result

    settings = Settings()
    config = load_config(args.config, args.epochs, promote=not args.no_promote,
                         refresh_states=not args.no_refresh_states, promote_wait_s=args.promote_wait_s,
                         refit=not args.no_refit)
    as_of, lookback_days = args.as_of, args.lookback_days
    if as_of is None or lookback_days == "all":
        from towerflow.data.source import ParquetSource

        as_of, lookback_days = default_window(ParquetSource(args.source or settings.source).days(), as_of,
                                              lookback_days)
    with prefect_api(settings):
        flow = retrain_ranker if args.ranker_only else retrain
        result = flow(as_of=as_of, lookback_days=lookback_days, config=config, source_uri=args.source)
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print_result(result, settings)
        if result.user_states:
            print(f"\nuser states {result.user_states.n_users:,} users stored for {result.release_id}")
    if result.user_states_error:  # the promotion stands (exit 0); serving uses the online path until a refresh
        print(f"warning: {result.user_states_error}; {result.release_id} is champion, its users are served on the "
              "online path until `towerflow serve refresh` or the hourly refresh-user-states run", file=sys.stderr)
    return 0
