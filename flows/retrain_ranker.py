"""The retrain-ranker flow: retrain only the ranker, against the champion's retriever, and promote a ranker-only
release that serves the champion's retrieval files by reference (infra/releases.py), gated against the champion's
ranker. Rankers decay within days without retraining (TransAct); the retriever's daily retrain is far costlier.

    extract -> validate_data -> champion_retriever -> build_ranking_examples -> train_ranker -> evaluate_ranker
            -> gate_ranker -> assemble_ranker_release -> promote_ranker [-> refresh-user-states]

The stages are the retrain flow's (flows/retrain_tasks.py) on the champion's vocabulary and item embeddings. A
snapshot without negatives (or ``config.ranker.enabled`` false) trains nothing and releases nothing
(status ``no_ranker``).
"""

from __future__ import annotations

from datetime import date

from prefect import flow, get_run_logger

from towerflow.config import RetrainConfig, Settings
from towerflow.flows import retrain_tasks as t
from towerflow.flows.retrain import validated_snapshot, window_end
from towerflow.flows.retrain_tasks import RetrainResult


@flow(name="retrain-ranker", log_prints=True)
def retrain_ranker(
    as_of: date | None = None,
    lookback_days: int = 7,
    config: RetrainConfig = RetrainConfig(),  # noqa: B008 - pydantic default shown in the Prefect UI
    source_uri: str | None = None,
) -> RetrainResult:
    """Retrain the champion's ranker on ``[as_of - lookback_days, as_of)``; promote it if its gate passes."""
    settings = Settings()
    end = window_end(as_of)
    run = t.start_tracking(settings, end, lookback_days, config)
    try:
        snapshot = validated_snapshot(settings, source_uri, end, lookback_days, config, run)
        base = t.champion_retriever(settings, run)
        ranking = t.build_ranking_examples(settings, snapshot, base, config, run)
        ranker = t.train_ranker(settings, ranking, base.embeddings, config.ranker, run)
        ranker_eval = t.evaluate_ranker(settings, snapshot, ranking, ranker, base, base.embeddings, config, run)
        t.gate_ranker(ranker_eval, config.ranker, run)
        release = t.assemble_ranker_release(settings, snapshot, base, ranker, ranker_eval, config, run)
        result = t.promote_ranker(settings, release, ranker_eval, run, config.promote, config.promotion)
    except BaseException:
        t.finish_tracking(run, "FAILED")
        raise
    t.finish_tracking(run, "FINISHED")
    if result is None:
        result = RetrainResult(status="no_ranker", snapshot_id=snapshot.snapshot_id, mlflow_run_id=run.run_id)
    elif config.refresh_user_states and result.status in ("promoted", "already_champion"):
        # user states are stored per release id: the new release's are the base's (same tower), written again
        result.user_states, result.user_states_error = t.refresh_states(result.release_id, source_uri, run)
    get_run_logger().info(f"retrain-ranker finished: {result.status} {result.release_id}")
    return result
