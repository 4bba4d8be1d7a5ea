"""The retrain flow: one window of events in, one gated, promoted release out (docs/architecture.md, "Pipeline").

    extract -> validate_data -> build_examples -> augment_context -> train -> evaluate -> gate_model
            -> embed_items -> build_index
            -> build_ranking_examples -> train_ranker -> evaluate_ranker -> gate_ranker
            -> assemble_release -> gate_release -> promote [-> refresh-user-states]

The flow body only chains stages; every stage is a thin task in flows/retrain_tasks.py over a pure function.
The ranking stages train the TransAct + DCN v2 ranker on the same snapshot over the candidate's item embeddings, so
it is bound to the release it ships in (infra/releases.py); with ``config.ranker.enabled`` false, or a snapshot that
holds no negatives (no impression, skip or hide rows), they pass None along and the release has no ranker.
After a promotion (and with ``config.refresh_user_states``), the refresh-user-states flow runs as a subflow for the
new champion, so serving has its offline user states at once; a refresh failure leaves the promotion standing and is
reported in ``RetrainResult.user_states_error`` (see ``retrain_tasks.refresh_states`` for why it does not fail).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from prefect import flow, get_run_logger

from towerflow.config import RetrainConfig, Settings
from towerflow.flows import retrain_tasks as t
from towerflow.flows.retrain_tasks import RetrainResult


def window_end(as_of: date | datetime | None) -> datetime:
    """as_of as a UTC datetime; a date means midnight UTC at its start; None means today."""
    if as_of is None:
        as_of = datetime.now(UTC).date()
    if isinstance(as_of, datetime):
        return as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC)
    return datetime.combine(as_of, time.min, tzinfo=UTC)


def validated_snapshot(settings: Settings, source_uri: str | None, end: datetime, lookback_days: int,
                       config: RetrainConfig, run: t.Tracking):
    """The window's snapshot, through the data gate (the first two stages of every retraining flow)."""
    snapshot = t.extract(settings, source_uri, end, lookback_days)
    t.validate_data(settings, snapshot, config.gates, run)
    return snapshot


@flow(name="retrain", log_prints=True)
def retrain(
    as_of: date | None = None,
    lookback_days: int = 7,
    config: RetrainConfig = RetrainConfig(),  # noqa: B008 - pydantic default shown in the Prefect UI
    source_uri: str | None = None,
) -> RetrainResult:
    """Retrain on ``[as_of - lookback_days, as_of)`` and promote the release if every gate passes."""
    settings = Settings()
    end = window_end(as_of)
    run = t.start_tracking(settings, end, lookback_days, config)

    try:
        snapshot = validated_snapshot(settings, source_uri, end, lookback_days, config, run)
        examples = t.build_examples(settings, snapshot, config.examples)
        examples = t.augment_context(examples, config.augment, config.train)
        trained = t.train(settings, examples, config.train, run)
        evaluation = t.evaluate(settings, snapshot, examples, trained, config.eval, run)
        t.gate_model(evaluation, config.gates, run)
        embeddings = t.embed_items(trained, examples, config.gates, run)
        index = t.build_index(embeddings, trained, examples, config.index, config.gates, run)
        ranking = t.build_ranking_examples(settings, snapshot, examples, config, run, trained, embeddings)
        ranker = t.train_ranker(settings, ranking, embeddings, config.ranker, run)
        ranker_eval = t.evaluate_ranker(settings, snapshot, ranking, ranker, examples, embeddings, config, run)
        t.gate_ranker(ranker_eval, config.ranker, run)
        release = t.assemble_release(settings, snapshot, examples, trained, embeddings, index, evaluation, config, run,
                                     ranker=ranker, ranker_eval=ranker_eval)
        t.gate_release(settings, release, examples, config.gates, run)
        result = t.promote(settings, release, evaluation, run, config.promote, config.promotion)
    except BaseException:
        t.finish_tracking(run, "FAILED")
        raise
    t.finish_tracking(run, "FINISHED")
    # after the run is closed: it records the model and its promotion, which stand whatever the refresh does
    if config.refresh_user_states and result.status in ("promoted", "already_champion"):
        result.user_states, result.user_states_error = t.refresh_states(result.release_id, source_uri, run)
    get_run_logger().info(f"retrain finished: {result.status} {result.release_id}")
    return result
