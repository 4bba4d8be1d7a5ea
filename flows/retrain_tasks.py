"""The retrain flow's stages as thin Prefect tasks: I/O, MLflow logging and UI artifacts around pure functions."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from pydantic import BaseModel, Field

from towerflow.config import (
    AugmentConfig,
    EvalConfig,
    ExamplesConfig,
    GateConfig,
    IndexConfig,
    PromotionConfig,
    RankerStageConfig,
    RetrainConfig,
    Settings,
    TrainConfig,
)
from towerflow.flows.refresh_user_states import RefreshResult
from towerflow.flows.stages import StageFailed, cached, publish_gate, publish_table, stage, stage_key
from towerflow.tasks.compare import Evaluation


class RetrainResult(BaseModel):
    status: str = Field(description="promoted | not_promoted | already_champion | no_ranker (retrain-ranker "
                                    "without ranking data)")
    release_id: str | None = None
    snapshot_id: str
    model_version: str | None = None
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = {}
    comparison: dict[str, dict[str, float]] = Field({}, description="holdout metrics of candidate, champion, baselines")
    previous_champion: str | None = None
    user_states: RefreshResult | None = Field(None, description="the states stored for the promoted release")
    user_states_error: str | None = Field(
        None, description="why those states were not stored; the release stays champion, served on the online path")



@dataclass
class Tracking:
    """The MLflow run that records this flow run (params, per-epoch metrics, gate reports, the release)."""

    run_id: str
    tracking_uri: str

    def client(self):
        return _client(self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(datetime.now().timestamp() * 1000)
        batch = [Metric(_metric_name(prefix + k), float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and np.isfinite(v)]
        if batch:
            self.client().log_batch(self.run_id, metrics=batch)

    def log_dict(self, data: dict, path: str) -> None:
        self.client().log_dict(self.run_id, data, path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        # one request for all of them (a round trip to the store each costs more than the rest of a small stage)
        self.client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str):
    """One MlflowClient per tracking URI for the process (each stage logs a few times: no new client per call)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def _metric_name(name: str) -> str:
    # MLflow names allow alphanumerics, _ - . space : / only
    return name.replace("@", "_at_").replace("=", "_")


@stage("start_tracking")
def start_tracking(settings: Settings, end: datetime, lookback_days: int, config: RetrainConfig) -> Tracking:
    from towerflow.infra.tracking import get_or_create_experiment, tracking_client

    client = tracking_client(settings)
    experiment_id = get_or_create_experiment(settings, client)
    ctx = get_run_context()
    flow_run = getattr(ctx, "flow_run", None) or getattr(getattr(ctx, "task_run", None), "flow_run", None)
    tags = {"towerflow.as_of": end.isoformat(), "towerflow.lookback_days": str(lookback_days)}
    if flow_run is not None:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    run = client.create_run(experiment_id, run_name=f"retrain-{end:%Y%m%d}", tags=tags)
    tracking = Tracking(run.info.run_id, settings.tracking_uri)
    from mlflow.entities import Param

    # in one batch: logged one at a time, the config's ~80 params took ~1 s of round trips to the store
    params = [Param(k, v) for k, v in _flatten(config.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):  # MLflow's limit per batch
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    get_run_logger().info(f"MLflow run {run.info.run_id} in experiment '{settings.experiment_name}'")
    return tracking


@stage("finish_tracking")
def finish_tracking(tracking: Tracking, status: str) -> None:
    """Close the MLflow run (FINISHED or FAILED) so the UI shows its status and duration."""
    tracking.client().set_terminated(tracking.run_id, status=status)


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flatten(v, key + ".")
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


@stage("extract", io_retries=2)
def extract(settings: Settings, source_uri: str | None, end: datetime, lookback_days: int):
    from towerflow.data.source import ParquetSource
    from towerflow.tasks.extract import extract as extract_snapshot

    snapshot = extract_snapshot(ParquetSource(source_uri or settings.source), end, lookback_days, settings.snapshots_dir)
    get_run_logger().info(str(snapshot))
    return snapshot


@stage("validate_data")
def validate_data(settings: Settings, snapshot, gates: GateConfig, tracking: Tracking) -> None:
    from towerflow.validation.data import SnapshotStats, validate_extracted

    stats_file = settings.data_root / "gates" / "last_data_stats.json"
    previous = SnapshotStats.from_dict(json.loads(stats_file.read_text())) if stats_file.exists() else None
    result = validate_extracted(snapshot, previous, gates)
    tracking.log_dict(result.to_dict(), "gates/data_gate.json")
    tracking.log_dict(result.gx_results, "gates/great_expectations.json")
    tracking.set_tags({"towerflow.snapshot_id": snapshot.snapshot_id, "towerflow.gate.data": result.passed})
    publish_gate(result, "data-gate")
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    stats_file.write_text(json.dumps(result.stats.to_dict()))


@stage("build_examples")
def build_examples(settings: Settings, snapshot, config: ExamplesConfig):
    from towerflow.tasks.build_examples import Examples
    from towerflow.tasks.build_examples import build_examples as build

    directory = settings.work_dir / "examples" / stage_key("build_examples", snapshot.snapshot_id,
                                                               config.model_dump(mode="json"))

    def compute(tmp: Path) -> None:
        build(snapshot.events(), snapshot.users(), snapshot.items(), snapshot.window[1], config).save(tmp / "examples")

    examples = cached(directory, compute, lambda d: Examples.load(d / "examples"), "build_examples")
    m = examples.meta
    get_run_logger().info(f"examples: {len(examples.train):,} train, {m.get('n_valid', 0):,} validation, "
                          f"{len(examples.holdout):,} holdout; split {m.get('split')} ({m.get('split_reason')})")
    return examples


@stage("augment_context")
def augment_context(examples, config: AugmentConfig, train: TrainConfig | None = None):
    from towerflow.tasks.refit import augment_examples, refit_wanted

    # the refit's rows are augmented only when a refit will train on them (train: None, as if it will)
    augmented, stats = augment_examples(examples, config, train is None or refit_wanted(train, examples)[0])
    get_run_logger().info(f"pseudo-context on {stats.n_augmented:,} of {stats.n_eligible:,} context-less rows "
                          f"(session {stats.n_session:,}, co-engaged {stats.n_cooccur:,}, content {stats.n_content:,}); "
                          f"pseudo-query on {stats.n_pseudo_query:,}")
    examples.train, examples.refit_extra = augmented.train, augmented.refit_extra
    return examples


@stage("train")
def train(settings: Settings, examples, config: TrainConfig, tracking: Tracking):
    from towerflow.tasks.train import TrainResult
    from towerflow.tasks.train import train as fit

    key = stage_key("train", examples.meta, len(examples.train), int(examples.train.target_items.sum()),
                    int(examples.train.context_items.sum()), config.model_dump(mode="json"))
    directory = settings.work_dir / "train" / key

    def on_epoch(stats) -> None:
        tracking.log_metrics({"loss": stats.loss, "examples_per_s": stats.examples_per_s,
                              **{f"valid.{k}": v for k, v in stats.metrics.items()}}, step=stats.epoch)

    fresh = []

    def on_refit_epoch(stats) -> None:
        tracking.log_metrics({"refit.loss": stats.loss, "refit.examples_per_s": stats.examples_per_s}, step=stats.epoch)

    def compute(tmp: Path) -> None:
        fresh.append(True)
        fit(examples, config, checkpoint_dir=directory.with_name(key + ".ckpt"), on_epoch=on_epoch,
            on_refit_epoch=on_refit_epoch).save(tmp)

    result = cached(directory, compute, TrainResult.load, "train")
    if not fresh:  # resumed: the epochs were logged by the run that trained; copy them into this run
        for stats in result.history:
            on_epoch(stats)
        for stats in result.refit_history:
            on_refit_epoch(stats)
    tracking.set_tags({"towerflow.train_key": key, "towerflow.best_epoch": result.best_epoch,
                       "towerflow.refit_epochs": result.refit_epochs})
    tracking.log_metrics({"train_seconds": result.seconds, "train_examples_per_s": result.examples_per_s,
                          "refit_epochs": result.refit_epochs})
    return result


def _champion(settings: Settings):
    """The current champion release, or None when nothing was promoted yet."""
    from towerflow.infra.releases import ReleaseNotFoundError, load_release

    try:
        return load_release(settings)
    except ReleaseNotFoundError:
        return None


@stage("evaluate")
def evaluate(settings: Settings, snapshot, examples, trained, config: EvalConfig, tracking: Tracking) -> Evaluation:
    from towerflow.tasks.compare import evaluate_candidate, score_champion
    from towerflow.tasks.vocabulary import Vocab

    ev = evaluate_candidate(trained.model, examples, config, refit=trained.refit_epochs > 0)
    champion = _champion(settings)
    if champion is not None:  # the champion scored on the SAME holdout, through its own vocabulary
        vocab = Vocab.from_json((champion.vocab_dir / "vocab.json").read_text())
        ev.champion, ev.champion_slices = score_champion(champion.model, vocab, examples, snapshot.users(), config)
        ev.champion_version, ev.champion_release = champion.version, champion.release_id

    groups = {"holdout.": ev.candidate, **{f"baseline.{name}.": m for name, m in ev.baselines.items()},
              **({"champion.": ev.champion} if ev.champion else {}),
              **{f"slice.{name}.": m for name, m in ev.slices.items()}}
    # one request to the store for all of them (a dozen round trips cost a third of a second)
    tracking.log_metrics({prefix + k: v for prefix, m in groups.items() for k, v in m.items()})
    rows = [{"model": "candidate", **_rounded(ev.candidate)}]
    if ev.champion:
        rows.append({"model": f"champion ({ev.champion_release})", **_rounded(ev.champion)})
    rows += [{"model": name, **_rounded(m)} for name, m in ev.baselines.items()]
    publish_table(rows, "metrics", "holdout metrics: candidate vs champion vs baselines")
    tracking.log_dict({"candidate": ev.candidate, "slices": ev.slices, "baselines": ev.baselines,
                       "champion": ev.champion, "champion_release": ev.champion_release}, "evaluation.json")
    _log_recall_plot(ev, config.ks, tracking)
    return ev


def _rounded(m: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in m.items() if k != "n"}


def _log_recall_plot(ev: Evaluation, ks, tracking: Tracking) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    curves = {"candidate": ev.candidate, **({"champion": ev.champion} if ev.champion else {}), **ev.baselines}
    for name, m in curves.items():
        ax.plot(list(ks), [m[f"recall@{k}"] for k in ks], marker="o", label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (holdout)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tracking.client().log_figure(tracking.run_id, fig, "plots/recall_at_k.png")
    plt.close(fig)


@stage("gate_model")
def gate_model(ev: Evaluation, gates: GateConfig, tracking: Tracking) -> None:
    from towerflow.validation.model import gate_model as judge
    from towerflow.validation.model import slices_by_name

    slices = slices_by_name(ev.slices, ev.champion_slices, ev.baseline_slices)
    result = judge(ev.candidate, ev.champion, ev.baselines, slices, gates)
    tracking.log_dict(result.to_dict(), "gates/model_gate.json")
    tracking.set_tags({"towerflow.gate.model": result.passed})
    publish_gate(result, "model-gate")


@stage("embed_items")
def embed_items(trained, examples, gates: GateConfig, tracking: Tracking):
    from towerflow.infra.releases import embed_release_items
    from towerflow.validation.embeddings import check_embeddings

    emb = embed_release_items(trained.model, examples.vocab, model_version=tracking.run_id)
    result = check_embeddings(emb.vectors, gates, seed=0)
    tracking.set_tags({"towerflow.gate.embeddings": result.passed, "towerflow.release_id": emb.release_id})
    publish_gate(result, "embedding-gate")
    return emb


@stage("build_index")
def build_index(emb, trained, examples, config: IndexConfig, gates: GateConfig, tracking: Tracking):
    from towerflow.tasks.build_index import build_index as build
    from towerflow.validation.index import gate_index_on_holdout

    index = build(emb, config)
    result = gate_index_on_holdout(index.search, emb.vectors, emb.item_ids, trained.model, examples.holdout,
                                   examples.user_feats, config, gates)
    tracking.log_metrics({"index_build_s": index.build_seconds, "index_items": emb.n_items})
    publish_gate(result, "index-gate")
    return index


@stage("build_ranking_examples")
def build_ranking_examples(settings: Settings, snapshot, examples, config: RetrainConfig, tracking: Tracking,
                           trained=None, emb=None):
    """The ranker's training and held-out requests (tasks/ranking_stage.py), or None when the ranking stages are
    off or the snapshot holds no negatives (then every later ranking stage passes None along: no ranker).

    With ``ranker.train.model.retrieval_score`` each request also gets the retriever's user vector: the candidate
    release's (``trained`` and ``emb``, the retrain flow) or the champion's (``examples`` a ``RankerBase``)."""
    from towerflow.tasks.history import to_us
    from towerflow.tasks.ranking_stage import has_negatives, ranking_data

    log = get_run_logger()
    if not config.ranker.enabled:
        log.info("ranking stages off (ranker.enabled = false): the release has no ranker")
        tracking.set_tags({"towerflow.ranker": "disabled"})
        return None
    events = snapshot.events()
    if not has_negatives(events):
        log.warning(f"ranking stages skipped: snapshot {snapshot.snapshot_id} has no impression, skip or hide rows "
                    "(e.g. an implicit file), so nothing tells a ranker what users did not want; the release has "
                    "no ranker")
        tracking.set_tags({"towerflow.ranker": "skipped: no negatives"})
        return None
    data = ranking_data(events, examples.vocab, config.ranker, to_us(snapshot.window[1]),
                        _history_days(examples, config),
                        lambda: _retriever(snapshot, examples, config, trained, emb))
    if len(data.train) == 0:  # e.g. a window no longer than ranker.holdout_days: a configuration, not an accident
        log.warning(f"ranking stages skipped: snapshot {snapshot.snapshot_id} has no request before its last "
                    f"{config.ranker.holdout_days} day(s) (ranker.holdout_days, held out to judge the ranker), so "
                    "there is nothing to train one on; widen the window (--lookback-days); the release has no ranker")
        tracking.set_tags({"towerflow.ranker": "skipped: no training requests"})
        return None
    log.info(f"ranking examples: {len(data.train):,} rows of {data.train.n_requests:,} requests train, "
             f"{len(data.holdout):,} rows of {data.holdout.n_requests:,} requests held out "
             f"(last {config.ranker.holdout_days} day(s)); sequences of {config.ranker.train.model.max_seq_len}")
    tracking.log_metrics({"ranker.train_rows": len(data.train), "ranker.holdout_rows": len(data.holdout),
                          "ranker.holdout_requests": data.holdout.n_requests})
    return data


def _retriever(snapshot, examples, config: RetrainConfig, trained, emb):
    """The retriever whose user vectors the ranker's examples get (tasks/request_vectors.py): the retrain's candidate
    (its model, item embeddings, demographics and history config), or the retrain-ranker flow's base."""
    from towerflow.tasks.history import HistorySpec
    from towerflow.tasks.ranking_stage import champion_retriever
    from towerflow.tasks.request_vectors import Retriever

    if isinstance(examples, RankerBase):
        return champion_retriever(examples.champion, examples.vocab, snapshot.users())
    return Retriever.of(trained.model, emb.vectors, examples.user_feats, HistorySpec.from_config(config.examples))


@stage("train_ranker")
def train_ranker(settings: Settings, data, emb, config: RankerStageConfig, tracking: Tracking):
    """The ranker over the candidate release's item table (so it is bound to that release); None without data."""
    if data is None:
        return None
    from dataclasses import asdict

    from towerflow.infra.releases import ranker_item_table
    from towerflow.models.ranker import load_ranker, save_ranker
    from towerflow.tasks.train import EpochStats
    from towerflow.tasks.train_ranker import train_ranker as fit

    table = ranker_item_table(emb.vectors)
    ex = data.train
    key = stage_key("train_ranker", emb.content_sha256(), len(ex), int(ex.item.sum()), float(ex.labels.sum()),
                    int(ex.hist_items.sum()), config.train.model_dump(mode="json"),
                    *([] if ex.user_vector is None else [float(np.abs(ex.user_vector).sum())]))

    def compute(tmp: Path) -> None:
        result = fit(ex, table, config.train)
        save_ranker(result.model, tmp / "ranker", emb.release_id)  # re-saved under the release's id by assemble
        (tmp / "history.json").write_text(json.dumps({"best_epoch": result.best_epoch, "seconds": result.seconds,
                                                      "history": [asdict(h) for h in result.history]}))

    def load(directory: Path):
        meta = json.loads((directory / "history.json").read_text())
        return load_ranker(directory / "ranker", table), meta

    model, meta = cached(settings.work_dir / "train_ranker" / key, compute, load, "train_ranker")
    for h in (EpochStats(**h) for h in meta["history"]):
        tracking.log_metrics({"loss": h.loss, **{f"valid.{k}": v for k, v in h.metrics.items()}}, prefix="ranker.",
                             step=h.epoch)
    tracking.log_metrics({"ranker.train_seconds": meta["seconds"]})
    tracking.set_tags({"towerflow.ranker.train_key": key, "towerflow.ranker.best_epoch": meta["best_epoch"]})
    return model


@stage("evaluate_ranker")
def evaluate_ranker(settings: Settings, snapshot, data, model, examples, emb, config: RetrainConfig,
                    tracking: Tracking):
    """Per-head AUC, GAUC and HIT@3 of the candidate ranker, the baselines and the champion's ranker on the held-out
    requests, into MLflow (``ranker.<model>.<metric>``) and a Prefect markdown artifact.

    ``examples`` is the retrain's examples, or the retrain-ranker flow's ``RankerBase``: then the champion is the one
    the ranker was bound to (``RankerBase.champion``), never re-read, so ``promote_ranker``'s compare-and-set refuses
    the promotion if another retrain promoted a newer retriever meanwhile."""
    if model is None:
        return None
    from towerflow.infra.releases import ranker_item_table
    from towerflow.tasks.ranking_stage import evaluate_ranking_stage
    from towerflow.validation.ranker import metric_table

    champion = examples.champion if isinstance(examples, RankerBase) else _champion(settings)
    ev = evaluate_ranking_stage(model, data, snapshot.events(), examples.vocab, ranker_item_table(emb.vectors),
                                _history_days(examples, config), champion, users=snapshot.users())
    groups = {"candidate": ev.candidate, **ev.baselines,
              **({"champion": ev.champion, "candidate_shared": ev.candidate_on_shared} if ev.champion else {})}
    tracking.log_metrics({f"ranker.{name}.{k}": v for name, m in groups.items() for k, v in m.items()})
    tracking.log_dict({"n_rows": ev.n_rows, "n_requests": ev.n_requests, "n_shared_rows": ev.n_shared_rows,
                       "champion_release": ev.champion_release, "notes": ev.notes, **groups}, "ranker/evaluation.json")
    for note in ev.notes:
        get_run_logger().info(note)
    create_markdown_artifact(markdown="### ranker on held-out requests\n\n" + metric_table(ev), key="ranker-metrics",
                             description=f"ranker: auc/mean {ev.candidate.get('auc/mean', float('nan')):.4f}")
    _log_ranker_plot(groups, tracking)
    return ev


def _log_ranker_plot(groups: dict[str, dict[str, float]], tracking: Tracking) -> None:
    """plots/ranker_heads.png: per-head AUC and HIT@3 of the candidate ranker, the baselines and the champion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from towerflow.config import RANKER_HEADS

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.8 / len(groups)
    for ax, kind in zip(axes, ("auc", "hit@3"), strict=True):
        for i, (name, m) in enumerate(groups.items()):
            ax.bar(np.arange(len(RANKER_HEADS)) + i * width, [m.get(f"{kind}/{h}", np.nan) for h in RANKER_HEADS],
                   width, label=name)
        ax.set_xticks(np.arange(len(RANKER_HEADS)) + 0.4 - width / 2, RANKER_HEADS)
        ax.set_ylabel(f"{kind} (held-out requests)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tracking.client().log_figure(tracking.run_id, fig, "plots/ranker_heads.png")
    plt.close(fig)


@stage("gate_ranker")
def gate_ranker(ev, config: RankerStageConfig, tracking: Tracking) -> None:
    if ev is None:
        return
    from towerflow.validation.ranker import gate_ranker as judge

    result = judge(ev, config.gate)
    tracking.log_dict(result.to_dict(), "gates/ranker_gate.json")
    tracking.set_tags({"towerflow.gate.ranker": result.passed})
    publish_gate(result, "ranker-gate")


@dataclass
class RankerBase:
    """What the retrain-ranker flow binds its ranker to: the champion's full release (its base when the champion is
    itself ranker-only), with its registered version, vocabulary and item embeddings, and the champion as loaded
    (the one the new ranker is compared with and whose version the promotion expects)."""

    manifest: Any  # infra.releases.ReleaseManifest of the full release
    version: int
    vocab: Any  # tasks.vocabulary.Vocab
    embeddings: Any  # tasks.embed_items.ItemEmbeddings
    champion: Any  # infra.releases.LoadedRelease
    max_history_days: int  # the history window serving applies with this retriever (its config.json)


def _history_days(examples, config: RetrainConfig) -> int:
    """The ranker sequences' history window: serving reads it from the release's config.json, which a ranker-only
    release takes from its base (infra/releases.py); so the retrain-ranker flow uses the base's, the retrain flow its
    own config's (the config its release records)."""
    return examples.max_history_days if isinstance(examples, RankerBase) else config.examples.max_history_days


@stage("champion_retriever", io_retries=2)
def champion_retriever(settings: Settings, tracking: Tracking) -> RankerBase:
    from towerflow.infra.releases import ReleaseNotFoundError, fetch_base, load_release
    from towerflow.tasks.embed_items import ItemEmbeddings
    from towerflow.tasks.history import HistorySpec
    from towerflow.tasks.vocabulary import Vocab

    try:
        champion = load_release(settings)
    except ReleaseNotFoundError as exc:
        raise ReleaseNotFoundError(f"{exc}; retrain-ranker retrains the champion's ranker: run the retrain flow "
                                   "first") from exc
    m = champion.manifest
    manifest, version = (fetch_base(settings, m), int(m.base["version"])) if m.base else (m, int(champion.version))
    vocab = Vocab.from_json((manifest.path / "vocab" / "vocab.json").read_text())
    get_run_logger().info(f"ranker bound to the retriever of release {manifest.release_id} (version {version}); "
                          f"champion {champion.release_id}")
    tracking.set_tags({"towerflow.base_release_id": manifest.release_id})
    days = HistorySpec.from_release_config(champion.release_id, champion.config).max_history_days
    return RankerBase(manifest, version, vocab, ItemEmbeddings.load(manifest.path), champion, days)


@stage("assemble_ranker_release")
def assemble_ranker_release(settings: Settings, snapshot, base: RankerBase, ranker, ranker_eval,
                            config: RetrainConfig, tracking: Tracking):
    """A ranker-only release over ``base`` (infra/releases.py), loaded once as serving loads it; None without a
    ranker (no ranking data: nothing to release)."""
    if ranker is None:
        return None
    from towerflow.infra.releases import load_release_dir, new_release_id, write_ranker_release

    manifest = write_ranker_release(settings.releases_dir, release_id=new_release_id(), base=base.manifest,
                                    base_version=base.version, ranker=ranker, config=config,
                                    snapshot_id=snapshot.snapshot_id, model_version=tracking.run_id,
                                    ranker_metrics=ranker_eval.candidate)
    load_release_dir(manifest.path, base_dir=base.manifest.path)  # every checksum, id and the ranker's binding
    tracking.set_tags({"towerflow.release_id": manifest.release_id})
    get_run_logger().info(f"ranker-only release {manifest.release_id} written to {manifest.path}, serving the "
                          f"retriever of {base.manifest.release_id} by reference")
    return manifest


@stage("promote_ranker", io_retries=2)
def promote_ranker(settings: Settings, manifest, ranker_eval, tracking: Tracking, do_promote: bool,
                   lease: PromotionConfig = PromotionConfig()):  # noqa: B008 - a pydantic default, never mutated
    """``promote`` for a ranker-only release: gated against the champion it compared its ranker with."""
    if manifest is None:
        return None
    comparison = {"candidate": ranker_eval.candidate, **ranker_eval.baselines,
                  **({f"champion {ranker_eval.champion_release}": ranker_eval.champion} if ranker_eval.champion
                     else {})}
    return register_and_promote(settings, manifest, tracking, do_promote, lease, ranker_eval.champion_version,
                                ranker_eval.champion_release, ranker_eval.candidate, comparison)


@stage("assemble_release")
def assemble_release(settings: Settings, snapshot, examples, trained, emb, index, ev: Evaluation,
                     config: RetrainConfig, tracking: Tracking, ranker=None, ranker_eval=None):
    from towerflow.infra.releases import assemble

    manifest = assemble(settings.releases_dir, model=trained.model, vocab=examples.vocab, embeddings=emb,
                        index=index, config=config, snapshot_id=snapshot.snapshot_id, candidate_metrics=ev.candidate,
                        ranker=ranker, ranker_metrics=ranker_eval.candidate if ranker_eval else None)
    get_run_logger().info(f"release {manifest.release_id} written to {manifest.path}"
                          + (" with its ranker" if ranker is not None else ""))
    return manifest


@stage("gate_release")
def gate_release(settings: Settings, manifest, examples, gates: GateConfig, tracking: Tracking) -> None:
    from towerflow.infra.releases import load_release_dir
    from towerflow.serving.retrieval import answer
    from towerflow.validation.release import gate_release_on_holdout

    release = load_release_dir(manifest.path)  # exactly as serving loads it: verify every checksum and id
    result = gate_release_on_holdout(lambda batch, k: answer(release, batch, k)[0], examples.holdout,
                                     examples.user_feats, manifest.release_id, len(release.item_ids), gates)
    tracking.set_tags({"towerflow.gate.release": result.passed})
    publish_gate(result, "release-gate")


@stage("promote", io_retries=2)
def promote(settings: Settings, manifest, ev: Evaluation, tracking: Tracking, do_promote: bool,
            lease: PromotionConfig = PromotionConfig()):  # noqa: B008 - a pydantic default, never mutated
    metrics = {k: v for k, v in ev.candidate.items() if k != "n"}
    comparison = {"candidate": metrics, **({f"champion {ev.champion_release}": ev.champion} if ev.champion else {}),
                  **ev.baselines}
    return register_and_promote(settings, manifest, tracking, do_promote, lease, ev.champion_version,
                                ev.champion_release, metrics, comparison)


def register_and_promote(settings: Settings, manifest, tracking: Tracking, do_promote: bool, lease: PromotionConfig,
                         champion_version: int | None, champion_release: str | None, metrics: dict[str, float],
                         comparison: dict[str, dict[str, float]]) -> RetrainResult:
    """Register the release and, with ``do_promote``, make it champion if the champion is still the one it was
    gated against (``champion_version``)."""
    from towerflow.infra.promote import promote as flip
    from towerflow.infra.promote import register_release
    from towerflow.infra.tracking import ensure_store

    ensure_store(settings)
    version = register_release(manifest.path, tracking.run_id, settings)
    base = {"release_id": manifest.release_id, "snapshot_id": manifest.snapshot_id, "model_version": str(version),
            "mlflow_run_id": tracking.run_id, "metrics": metrics, "previous_champion": champion_release,
            "comparison": comparison}
    if not do_promote:
        publish_release_card(manifest, version, "registered, not promoted (promote=false)", tracking)
        return RetrainResult(status="not_promoted", **base)
    # the promotion lease (infra/lease.py) makes two promotions on this data root take turns; a crashed holder
    # frees it (at once on this host, after lease.lease_s elsewhere), and a waiter logs the holder and gives up
    # after lease.wait_s; the compare-and-set on the alias catches promoters on other data roots
    flow_run = getattr(getattr(get_run_context(), "task_run", None), "flow_run_id", None)
    result = flip(version, settings, expected_champion=champion_version, wait_s=lease.wait_s,
                  lease_s=lease.lease_s, on_wait=get_run_logger().warning,
                  note=f"retrain flow run {flow_run}" if flow_run else "")
    get_run_logger().info(str(result))
    tracking.set_tags({"towerflow.promoted": True})
    publish_release_card(manifest, version, str(result), tracking)
    return RetrainResult(status="promoted" if result.changed else "already_champion", **base)


def publish_release_card(manifest, version: int, status: str, tracking: Tracking) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = [f"# Release {manifest.release_id}", "", f"**{status}**", "",
             "| field | value |", "| --- | --- |",
             f"| registered model version | {version} |", f"| snapshot | {manifest.snapshot_id} |",
             f"| MLflow run | {tracking.tracking_uri} run `{tracking.run_id}` |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(manifest.metrics.items())]
    lines += ["", "| artifact | sha256 |", "| --- | --- |"]
    lines += [f"| {f} | `{h[:16]}` |" for f, h in sorted(manifest.files.items())]
    create_markdown_artifact(markdown="\n".join(lines), key="release-card", description=status)


def refresh_states(release_id: str, source_uri: str | None, tracking: Tracking):
    """Store the offline user states of the release just promoted: the ``refresh-user-states`` flow as a subflow.

    Returns ``(RefreshResult, None)``, or ``(None, "stage 'refresh_user_states' failed: <cause>")``: a failure is
    reported, never raised. The promotion before it is complete and consistent (tower and index flipped together);
    without states the service answers the release's users on the online path (same answers, slower), and the
    hourly ``refresh-user-states`` deployment writes them on its next run. Failing the retrain here would instead
    make a rerun or a backfill retrain and promote yet another release.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from towerflow.flows.refresh_user_states import refresh_user_states

    log = get_run_logger()
    try:
        # the default window and as_of (the source's horizon) are the service's, so a state equals its online h.
        # No heartbeat thread of its own: this flow run's heartbeats already cover the process, and Prefect joins
        # a flow's heartbeat thread mid-sleep at its end (up to 1 s per flow run, measured 0.98 s on an empty one)
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            refreshed = refresh_user_states(release=release_id, source_uri=source_uri)
    except Exception as exc:  # noqa: BLE001 - reported in the result, the log and MLflow; the promotion stands
        error = str(StageFailed("refresh_user_states", exc))
        log.error(f"{error}; {release_id} stays champion and is served on the online path until states are "
                  "refreshed (hourly deployment refresh-user-states, or: towerflow serve refresh)")
        tracking.set_tags({"towerflow.user_states": "failed", "towerflow.user_states_error": error[:5000]})
        return None, error
    tracking.set_tags({"towerflow.user_states": refreshed.n_users})
    return refreshed, None
