"""One typed settings object for the environment, and typed configs for every stage.

Settings come from the environment (prefix ``TOWERFLOW_``); stage configs are pydantic models passed as flow
parameters so the Prefect UI shows them, and can be loaded from a YAML/JSON file (``--config FILE``).
Nothing here touches the disk or a server at import time.
"""

from __future__ import annotations

import json
import math
import numbers
import types
import typing
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from towerflow.errors import TowerflowError

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near this is not one


class Settings(BaseSettings):
    """Where things live. Every field can be set as ``TOWERFLOW_<NAME>`` (e.g. ``TOWERFLOW_DATA_ROOT``)."""

    model_config = SettingsConfigDict(env_prefix="TOWERFLOW_", extra="ignore")

    data_root: Path = Field(Path(".towerflow"), description="Root for sources, snapshots, releases, stores.")
    source_uri: str | None = Field(None, description="Event source (local path or fsspec URL); default <data_root>/source.")
    mlflow_tracking_uri: str | None = Field(None, description="Default sqlite:///<data_root>/mlflow.db.")
    prefect_api_url: str | None = Field(None, description="None runs flows on Prefect's ephemeral API.")
    experiment_name: str = "towerflow"
    registered_model: str = Field("towerflow-retrieval", description="MLflow registered model holding releases.")
    realtime_uri: str | None = Field(None, description="Realtime action store: redis://host:port/db (several service "
                                                       "replicas share it); default SQLite at <data_root>/realtime.sqlite.")
    release_gc_min_age_hours: float = Field(
        24.0, ge=0, description="`release gc` keeps every release younger than this (a retrain between assembling "
                                "its release and promoting it), however many newer ones a backfill wrote.")

    @property
    def source(self) -> str:
        return self.source_uri or str(self.data_root / "source")

    @property
    def snapshots_dir(self) -> Path:
        return self.data_root / "snapshots"

    @property
    def releases_dir(self) -> Path:
        return self.data_root / "releases"

    @property
    def work_dir(self) -> Path:
        """Per-run intermediate results (examples, checkpoints) that let a failed run resume."""
        return self.data_root / "work"

    @property
    def user_states_path(self) -> Path:
        return self.data_root / "user_states.sqlite"

    @property
    def realtime_path(self) -> Path:
        """The embedded realtime action store (used when ``realtime_uri`` is unset)."""
        return self.data_root / "realtime.sqlite"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.data_root / 'mlflow.db').resolve()}"


def _merged(default: BaseModel, over: dict) -> dict:
    """``default`` dumped, with ``over``'s keys put in: a nested config model merged key by key, any other value
    (a plain dict such as ``score_weights`` included) replaced whole, so a dump validates back to the same config."""
    out = default.model_dump()
    for key, value in over.items():
        sub = getattr(default, key, None)
        out[key] = _merged(sub, value) if isinstance(value, dict) and isinstance(sub, BaseModel) else value
    return out


class ConfigError(TowerflowError, ValueError):
    """A config file that cannot be used; the message names the file and, where there is one, the key."""


def _field_kinds(annotation: object) -> tuple[object, ...]:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else (annotation,)


class _Config(BaseModel):
    """Unknown keys are errors; booleans and whole numbers are strict: ``epochs: true`` or ``use_context: 1`` is
    refused rather than read as 1 or true (floats still take ints, and strings such as YAML 1.1's ``3e-3``)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: object, info: ValidationInfo) -> object:
        kinds = _field_kinds(cls.model_fields[info.field_name].annotation)
        if value is None or (isinstance(value, bool) and bool in kinds):
            return value  # None where it is not allowed: pydantic says so
        names = [a for k in kinds if typing.get_origin(k) is typing.Literal for a in typing.get_args(k)]
        if isinstance(value, str) and value in names:
            return value  # a named choice beside a number, e.g. "auto"
        if bool in kinds:
            raise ValueError(f"must be true or false, got {value!r}")
        whole = int in kinds and float not in kinds and str not in kinds
        if isinstance(value, bool) and (int in kinds or float in kinds):
            raise ValueError(f"must be a {'whole number' if whole else 'number'}, got {value!r}")
        if whole and not isinstance(value, numbers.Integral):
            raise ValueError(f"must be {''.join(f'{n} or ' for n in names)}a whole number, got {value!r}")
        return value


class WorldConfig(_Config):
    """Size and shape of the synthetic world (the embedded default source and the test bed)."""

    n_users: int = Field(2_000, ge=1)
    n_items: int = Field(3_000, ge=10, description="Catalog size on the first day.")
    n_topics: int = Field(20, ge=2)
    days: int = Field(14, ge=1)
    events_per_day: int = Field(20_000, ge=1)
    new_items_per_day: int = Field(50, ge=0)
    interests_per_user: int = Field(3, ge=1)
    drift_per_day: float = Field(0.05, ge=0, le=1, description="Chance a user swaps one interest each day.")
    popularity_exponent: float = Field(1.1, gt=0, description="Zipf exponent of item popularity in a topic.")
    feature_dim: int = Field(8, ge=0, description="Length of the items' dense feature vector (0: none).")
    slate_size: int = Field(
        1, ge=1, description="Items one request shows at once (a slate, grouped by events.request_id); each session "
                             "step is one request, so a day holds about events_per_day x slate_size events. 1: one "
                             "item per step and no request_id column (the worlds of earlier versions).")
    start: date = date(2026, 1, 1)
    seed: int = 0


class ExamplesConfig(_Config):
    """How examples and histories are built (tasks/history.py is THE history definition, tasks/build_examples.py the
    splits). ``max_seq_len`` and ``gap_buckets`` must fit ``ModelConfig`` (RetrainConfig checks it)."""

    max_seq_len: int = Field(16, ge=1, description="Last L actions fed to the history encoder.")
    max_history_days: int = Field(
        365, ge=1, description="Actions older than this (from the request time) leave the history; long enough for "
                               "users who come back monthly.")
    gap_reference: Literal["latest_action"] = Field(
        "latest_action", description="Token time gaps are measured from the user's own latest action (not from the "
                                     "request time); recorded so serving rebuilds the same features.")
    holdout_days: int = Field(1, ge=1, description="time split: the last N days of the window are held out.")
    split: Literal["auto", "time", "leave_one_out"] = Field(
        "auto", description="auto: time when the holdout days hold positives of at least auto_min_share of the "
                            "window's users (or auto_min_users users), else leave_one_out (e.g. a public dataset "
                            "spread over months); the retrain says which it chose.")
    auto_min_share: float = Field(0.25, ge=0, le=1, description="auto split: share of users needed in the holdout.")
    auto_min_users: int = Field(1_000, ge=1, description="auto split: or this many users in the holdout.")
    max_holdout_users: int | None = Field(5_000, description="Cap on holdout examples scored (one per user).")
    validation: bool = Field(
        True, description="Also cut a validation split before the holdout for early stopping, so the holdout the "
                          "model gate judges is never used to select the model.")
    gap_buckets: int = Field(16, ge=2, description="Time-gap buckets; must equal ModelConfig.gap_buckets.")
    max_genres: int = Field(4, ge=1, description="Genres kept per item.")
    seed: int = Field(0, description="Seed of the holdout-user sample when capped.")


class AugmentConfig(_Config):
    pseudo_context_prob: float = Field(0.5, ge=0, le=1, description="Chance a context-less row gets a pseudo-context.")
    session_gap_s: int = Field(1800, ge=1, description="Co-engagements within this many seconds share a session.")
    pseudo_query_prob: float = Field(
        0.3, ge=0, le=1, description="Chance a row without context and without query gets a pseudo-query: words of the "
                                     "engaged item's title and category (tasks/augment_context.py).")
    query_word_dropout: float = Field(0.5, ge=0, lt=1, description="Chance each word of a pseudo-query is dropped "
                                                                   "(one word is always kept).")
    seed: int = 0


class ModelConfig(_Config):
    # Defaults sized for a 2-core laptop (the demo world trains in a couple of minutes); bench/quality.py and
    # bench/movielens.py give the figures, bench/train_throughput.py the cost.
    dim: int = Field(32, ge=4, description="Output embedding size of both towers.")
    d_model: int = Field(32, ge=4)
    n_heads: int = Field(2, ge=1)
    n_layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    context_dropout: float = Field(
        0.2, ge=0, lt=1, description="Dropout of the viewed item in training (0.5 learned context more slowly)."
    )
    latest_tokens: int = Field(1, ge=1, description="Latest tokens concatenated with the max-pool (TransAct).")
    use_context: bool = True
    history_residual: bool = Field(
        True, description="Also add the mean vector of the items in the history engaged with (gated) to the user vector."
    )
    context_residual: bool = Field(
        True, description="Also add the viewed item's vector (gated) to the user vector, besides the MLP input."
    )
    gap_buckets: int = Field(16, ge=2)
    hidden: int = Field(64, ge=4, description="Hidden width of the tower MLPs.")
    id_dropout: float = Field(0.1, ge=0, lt=1, description="Chance an item's id embedding is dropped in training.")
    max_seq_len: int = Field(64, ge=1, description="Longest history the position table covers.")
    use_query: bool = Field(
        True, description="The search query (hashed words + 3-grams, models/query.py) joins the context layer, and "
                          "items' title + category words enter the item tower through the same embedding bag. A saved "
                          "model from before this field loads with false.")
    query_buckets: int = Field(16_384, ge=1, description="Rows of the hashed token table shared by queries and items.")
    query_dropout: float = Field(0.2, ge=0, lt=1, description="Dropout of the whole query in training.")
    query_residual: bool = Field(
        True, description="Also add a projection of the query's token bag (gated) to the user vector.")


def check_history_fits_model(max_seq_len: int, gap_buckets: int, model: ModelConfig) -> None:
    """The one check that histories (``ExamplesConfig``'s, or built examples') fit the model's tables: ValueError
    naming both sides when they do not."""
    if gap_buckets != model.gap_buckets:
        raise ValueError(f"examples.gap_buckets ({gap_buckets}) must equal train.model.gap_buckets "
                         f"({model.gap_buckets})")
    if max_seq_len > model.max_seq_len:
        raise ValueError(f"examples.max_seq_len ({max_seq_len}) exceeds train.model.max_seq_len "
                         f"({model.max_seq_len}), the tower's position table")


class TrainConfig(_Config):
    model: ModelConfig = ModelConfig()
    epochs: int = Field(
        40, ge=1, description="At most: training stops earlier when the validation split stops improving (patience); "
                              "the cosine schedule decays to 0 at this cap.")
    batch_size: int = Field(512, ge=2)
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: linear warm-up, then cosine decay to 0 at the last epoch."
    )
    warmup: float = Field(0.05, ge=0, lt=1, description="Share of all training steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(0.1, gt=0, description="Softmax temperature on cosine logits.")
    logq: bool = True
    mixed_negatives: int = Field(0, ge=0, description="Uniform corpus negatives added to the in-batch ones.")
    patience: int = Field(
        5, ge=1, description="Epochs without improvement before stopping. A validation split of ~1,000 users moves "
                             "by about 0.01 recall@10 between epochs by chance; 3 stopped MovieLens-100K runs early.")
    average_epochs: Literal["auto"] | float = Field(
        "auto", description="Judge each epoch, and keep the best, with a moving average of the weights over about this "
                            "many epochs' steps (models/averaging.py) instead of the live weights; 0 turns it off. auto: "
                            "2.5 on a leave-one-out split (static data, a small validation split whose noise the average "
                            "smooths: MovieLens-100K +0.01 HR@10 at library level, bench/public_split.py, 3 seeds; one "
                            "served run through the public path was level), 0 on a time split (drifting daily data, "
                            "where the "
                            "average lags behind fresh items: the synthetic world's related slice -0.023). README.")
    future_targets: Literal["auto"] | int = Field(
        "auto", description="Each training history also predicts the user's next N - 1 engagements after its own "
                            "target (PinnerFormer's dense all-action loss over the next N engagements, N <= 16; "
                            "tasks/future_targets.py): up to N times the training rows per epoch. auto: 3 on a "
                            "leave-one-out split (MovieLens-style sittings, whose order says little), 1 on a time "
                            "split; the retrain says which. README.")
    early_stopping_metric: str = Field("recall@10", description="Watched on the validation split (or holdout).")
    refit: Literal["auto"] | bool = Field(
        "auto", description="After early stopping picked the epoch count on the validation split, train again from "
                            "scratch on train + validation rows for that many epochs (same seed, schedule and weight "
                            "averaging; logQ counts the validation rows) and keep that model (tasks/refit.py): the "
                            "validation day's items and engagements reach the release. The holdout is never trained "
                            "on. Costs about one more training run. auto: on for a time split (the validation day "
                            "holds the freshest items), off for leave-one-out; the retrain says which. README.")
    q_estimator: Literal["exact", "streaming"] = Field(
        "exact", description="log q from exact target counts, or the streaming estimator of Yi et al. (2019)."
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # 1, not one per core: with anything else running on a 2-core machine (the demo's Prefect server, CI, other
    # jobs) two intra-op threads wait on each other and a step takes 20x longer (bench/train_throughput.py); on
    # an idle machine one thread gives up less than 2x on these small matmuls.
    num_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads while training (None: torch's default, one per core)."
    )

    @field_validator("future_targets", "average_epochs")
    @classmethod
    def _auto_or_at_least(cls, value: str | float, info: ValidationInfo) -> str | float:
        least, most, unit = {"future_targets": (1, 16, "targets"), "average_epochs": (0, math.inf, "epochs")}[
            info.field_name]
        if value != "auto" and not least <= value <= most:
            raise ValueError(f"must be auto or a number of {unit} in [{least}, {most}], got {value}"
                             if most < math.inf else f"must be auto or a number of {unit} >= {least}, got {value}")
        return value


RANKER_HEADS: tuple[str, ...] = ("click", "save", "conversion", "skip", "hide")


class RankerConfig(_Config):
    """The TransAct + DCN v2 ranker (models/ranker.py). Sequence sizes follow Pinterest's TransAct (S = 100,
    K = 10, 2 layers, 1 head, feed-forward 32); widths are sized for 200 candidates on one CPU thread."""

    max_seq_len: int = Field(100, ge=1, description="S: the user's last S actions before the request.")
    latest_k: int = Field(10, ge=1, description="K: latest positions kept, flattened, beside the max-pool.")
    use_sequence: bool = Field(True, description="False: the same DCN v2 without the sequence (the baseline).")
    affinity_features: bool = Field(
        True, description="With use_sequence: the candidate's cosine with the mean and the max over the sequence's "
                          "positive and its negative actions' item vectors, 4 numbers beside TransAct into the DCN "
                          "(models/ranker.py affinity_features). A ranker saved before this field loads as False.")
    retrieval_score: bool = Field(
        False, description="The retriever's score u . v of the candidate (u: the release's user vector at the request, "
                           "as /recommend's first stage computes it) and whether the request has a u, 2 numbers into "
                           "the DCN (models/ranker.py retrieval_features); its examples need a retriever "
                           "(tasks/request_vectors.py). A ranker saved before this field loads as False.")
    recency_feature: bool = Field(
        False, description="With use_sequence: how long ago the latest action of the sequence was (log seconds) and "
                           "whether there is one, 2 numbers into the DCN (models/ranker.py recency_features): TransAct "
                           "has no times, so it cannot tell an ongoing session from a new one. Off: /recommend's request "
                           "time is the user's latest known action + 1 us (serving/service.py _user_actions), not the "
                           "clock, so served ages are not training's (README, two-stage quality). A ranker saved "
                           "before this field loads as False.")
    retrieval_weight: float = Field(
        0.0, ge=0, description="With retrieval_score: the blended score also adds this weight x u . v, the retriever's "
                               "own score (models/ranker.py Ranker.ranking_score). The heads learn P(engaged | shown); "
                               "among /recommend's 200 retrieved candidates, which a user would have been shown is what "
                               "the retriever knows and a ranker trained on shown slates cannot. 0: the heads alone "
                               "(and a ranker saved before this field).")
    action_dim: int = Field(8, ge=1, description="Action-type embedding width.")
    item_dim: int = Field(16, ge=1, description="Width the frozen release item vectors are projected to.")
    item_id_embedding: bool = Field(False, description="Also learn an item-id embedding, added to the projection.")
    surface_dim: int = Field(4, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(1, ge=1)
    ff_dim: int = Field(32, ge=1, description="Transformer feed-forward width.")
    dropout: float = Field(0.1, ge=0, lt=1)
    time_window_s: float = Field(
        3600.0, ge=0, description="Training only: actions younger than a random U(0, this) window before the request "
                                  "are masked, so the model does not lean on the last seconds alone (TransAct).")
    time_window_prob: float = Field(0.5, ge=0, le=1, description="Share of training rows that get the window mask.")
    cross_layers: int = Field(2, ge=0, description="DCN v2 cross layers x_{l+1} = x0 * (W x_l + b) + x_l.")
    cross_rank: int | None = Field(None, ge=1, description="Low-rank cross layers W = U V^T of this rank (None: full).")
    structure: Literal["parallel", "stacked"] = Field("parallel", description="MLP beside or after the cross net.")
    mlp_hidden: tuple[int, ...] = (64, 32)
    loss_weights: dict[str, float] = Field(
        {"click": 1.0, "save": 1.0, "conversion": 1.0, "skip": 1.0, "hide": 1.0},
        description="Weighted BCE: each head's weight in the loss.")
    score_weights: dict[str, float] = Field(
        {"click": 1.0, "save": 2.0, "conversion": 3.0, "skip": -0.5, "hide": -3.0},
        description="Blended ranking score: sum of weight x head probability (hide and skip negative).")

    @field_validator("loss_weights", "score_weights")
    @classmethod
    def _known_heads(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        unknown = sorted(set(value) - set(RANKER_HEADS))
        if unknown:
            raise ValueError(f"{info.field_name}: unknown head(s) {unknown}; heads are {list(RANKER_HEADS)}")
        return value

    @model_validator(mode="after")
    def _k_fits(self) -> RankerConfig:
        if self.latest_k > self.max_seq_len:
            raise ValueError(f"latest_k ({self.latest_k}) exceeds max_seq_len ({self.max_seq_len})")
        if self.retrieval_weight and not self.retrieval_score:
            raise ValueError(f"retrieval_weight ({self.retrieval_weight}) needs retrieval_score: the ranker gets u . v "
                             "only with it (the retrain's ranking stage defaults to retrieval_weight 2: set "
                             "retrieval_weight: 0 as well)")
        return self


class RankerTrainConfig(_Config):
    """Training of the ranker (tasks/train_ranker.py): AdamW, early stopping on the validation split's mean AUC."""

    model: RankerConfig = RankerConfig()
    epochs: int = Field(10, ge=1, description="At most: stops earlier when validation AUC stops improving.")
    batch_size: int = Field(512, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(2, ge=1)
    validation_share: float = Field(0.1, gt=0, lt=1, description="Latest share of training requests held for "
                                                                 "early stopping.")
    seed: int = 0
    num_threads: int | None = Field(1, ge=1, description="torch intra-op threads (see TrainConfig.num_threads).")


class RankerGateConfig(_Config):
    """The ranker gate (validation/ranker.py), judged on the held-out requests of the retrain's snapshot."""

    metric: str = Field("auc/mean", description="tasks/evaluate_ranker.py metric the gate compares (higher better).")
    min_lift_over_baselines: float = Field(
        0.0, description="The candidate's metric must exceed each baseline's (popularity; profile_dot, the "
                         "retrieval-score stand-in) by more than this (absolute).")
    blocking_baselines: tuple[str, ...] = Field(
        ("popularity",), description="Baselines whose check fails the gate; the others are reported as warnings "
                                     "(profile_dot knows the user's long-term profile, which this flow's ranker, "
                                     "without dense features, only sees through its last S actions).")
    max_regression: float = Field(
        0.01, ge=0, description="And may fall at most this much below the champion's ranker on the same rows.")
    min_holdout_requests: int = Field(20, ge=1, description="Fewer held-out requests than this cannot judge a "
                                                            "ranker: the gate fails.")


class RankerStageConfig(_Config):
    """The retrain's ranking stages (flows/retrain.py): build_ranking_examples -> train_ranker -> evaluate_ranker ->
    gate_ranker. Defaults are sized for ``make demo`` (S = 32 and the latest 20k requests: a few seconds an epoch on
    one thread; Pinterest's S = 100 is ``train.model.max_seq_len: 100``)."""

    enabled: bool = Field(True, description="False: no ranking stages; the release has no ranker.")
    # the flow always has a retriever (the candidate release's, or the champion's): its ranker reads its score, and
    # ranks by it too (retrieval_weight 2: the best of 0.5-3 on bench.ranking's two-stage worlds, README "Ranking")
    train: RankerTrainConfig = RankerTrainConfig(
        model=RankerConfig(max_seq_len=32, retrieval_score=True, retrieval_weight=2.0), epochs=3)
    holdout_days: int = Field(1, ge=1, description="The last N days of the window are the held-out requests.")
    max_train_requests: int | None = Field(
        20_000, ge=1, description="Train on the latest this many requests before the holdout (None: all of them).")
    max_holdout_requests: int | None = Field(10_000, ge=1, description="Judge on the latest this many held-out "
                                                                       "requests (None: all).")
    retrieved_negatives: int = Field(
        0, ge=0, description="With train.model.retrieval_score: add this many items per training request, drawn "
                             "from the retriever's top retrieved_depth for it (not shown, not in its sequence), as "
                             "rows with no engagement, so the ranker also learns to order what /recommend gives it "
                             "(tasks/ranking_examples.py with_retrieved_candidates). 0: the shown slates alone.")
    retrieved_depth: int = Field(200, ge=1, description="How deep in the retriever's list those items are drawn.")
    gate: RankerGateConfig = RankerGateConfig()

    @field_validator("train", mode="before")
    @classmethod
    def _train_over_stage_defaults(cls, value: object) -> object:
        """A partial ``train`` (``{epochs: 5}``) keeps this stage's defaults (S = 32, the retrieval score and its
        weight) for every key it does not name, not RankerTrainConfig's: they differ, and a silent swap would drop
        the retrieval score from a ranker whose config only meant to change its epochs."""
        if isinstance(value, dict):
            return _merged(cls.model_fields["train"].default, value)
        return value


class EvalConfig(_Config):
    ks: tuple[int, ...] = (10, 50, 100)
    short_history_max: int = Field(5, description="Users with at most this many past actions form a slice.")


class GateConfig(_Config):
    """Thresholds of every gate (docs/architecture.md, "Gates")."""

    max_volume_drop: float = Field(
        10.0, gt=1, description="Data: fail when events per day fall by this factor or more vs the previous snapshot."
    )
    max_volume_growth: float = Field(
        10.0, gt=1, description="Data: fail when events per day grow by this factor or more (double ingestion)."
    )
    positive_rate_range: tuple[float, float] = Field(
        (0.01, 0.99), description="Data: absolute bounds on the share of click/save/conversion events."
    )
    max_positive_rate_ratio: float = Field(
        2.0, gt=1, description="Data: fail when the positive rate moves by more than this factor vs the previous snapshot."
    )
    max_misplaced_events: int = Field(
        0, ge=0, description="Data: rows of the window's partitions whose ts is not on their partition's day (or is "
                             "outside the window), which extract cannot keep; more than this fails."
    )
    max_empty_days: int = Field(
        0, ge=0, description="Data: days of the window with no events (no partition, or an empty one) allowed; the "
                             "last day must have events whatever this says."
    )
    metric: str = Field("recall@10", description="Model: the primary metric, gated vs champion and popularity.")
    secondary_metrics: tuple[str, ...] = Field(
        ("ndcg@10",), description="Model: further metrics that may not regress vs champion."
    )
    max_regression: float = Field(0.02, ge=0, description="Allowed absolute drop vs champion.")
    lift_baseline: str = Field("popularity", description="Model: the baseline the candidate must beat.")
    min_lift_over_popularity: float = Field(0.0, description="Candidate must beat popularity by this (absolute).")
    max_mean_cosine: float = Field(0.9, description="Collapse bound: mean cosine of random item pairs.")
    norm_tolerance: float = Field(1e-3, gt=0, description="Embeddings: allowed |norm - 1| of L2-normalised vectors.")
    collapse_pairs: int = Field(10_000, ge=1, description="Embeddings: random item pairs sampled for the collapse check.")
    min_index_recall: float = Field(0.95, ge=0, le=1, description="Index: ANN Recall@K vs exact search.")
    max_release_latency_ms: float = Field(200.0, gt=0, description="Release: p99 latency of sample queries.")


class IndexConfig(_Config):
    kind: Literal["auto", "flat", "ivfflat", "hnsw", "ivfpq"] = "auto"
    flat_max_items: int = Field(50_000, description="auto: exact Flat up to this many items.")
    ivf_flat_max_items: int = Field(
        1_000_000, description="auto: IVF-Flat beyond flat_max_items up to this many items, HNSW beyond (on a 100k "
        "release's served user vectors IVF-Flat took half HNSW's CPU at higher recall: python -m bench.index --served).")
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = Field(80, ge=1)
    ivf_nlist: int | None = Field(None, description="IVF lists; default about 4 * sqrt(n_items).")
    pq_m: int = Field(16, description="PQ sub-quantizers; must divide the embedding dim.")
    pq_nbits: int = Field(8, ge=1, le=16, description="Bits per PQ code.")
    refine: Literal["none", "sq8", "flat"] = Field(
        "sq8", description="ivfpq: re-rank k * refine_k_factor PQ candidates with SQ8 or exact vectors.")
    refine_k_factor: int = Field(
        8, ge=1, description="ivfpq: PQ candidates re-ranked per neighbour asked for; at 4, recall@10 trails recall@100 "
        "(python -m bench.index).")
    train_sample: int = Field(
        100_000, ge=1, description="ivfpq: vectors sampled to train the quantizers (at least 39 per k-means centroid).")
    nprobe: int = Field(32, ge=1, description="ivfflat, ivfpq: IVF lists searched per query.")
    seed: int = 0
    recall_k: int = 100
    recall_sample: int = 500


class PromotionConfig(_Config):
    """The promotion lease (infra/lease.py) a retrain holds around the champion flip."""

    lease_s: float = Field(
        60.0, ge=5, description="A holder renews its lease every lease_s/4; one that died on this host (same "
                                "hostname, boot and PID namespace) frees it at once, one that stopped renewing "
                                "elsewhere after lease_s seconds.")
    wait_s: float = Field(
        300.0, ge=0, description="How long a retrain waits for another promotion's lease (logging the holder) "
                                 "before it fails naming the holder; 0 fails at once.")


class RetrainConfig(_Config):
    """Everything a retrain run needs besides the window; the flow's parameters."""

    examples: ExamplesConfig = ExamplesConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gates: GateConfig = GateConfig()
    index: IndexConfig = IndexConfig()
    ranker: RankerStageConfig = RankerStageConfig()
    promote: bool = True
    promotion: PromotionConfig = PromotionConfig()
    refresh_user_states: bool = Field(
        True, description="After a promotion, store the new champion's offline user states (refresh-user-states "
                          "as a subflow); a failure there is reported, never undoes the promotion."
    )

    @model_validator(mode="after")
    def _history_fits_model(self) -> RetrainConfig:
        check_history_fits_model(self.examples.max_seq_len, self.examples.gap_buckets, self.train.model)
        if self.train.refit is True and not self.examples.validation:
            # refused rather than ignored: the release would record a refit that never ran
            raise ValueError("train.refit true needs examples.validation true: the refit trains again on train + "
                             "the validation split's rows, and without a validation split there are none")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> RetrainConfig:
        """Load from YAML (``.yaml``/``.yml``) or JSON; see ``load_config_file``."""
        return load_config_file(cls, path)


def _yaml(text: str) -> object:
    """Safe YAML with aliases refused: a nest of aliases (a "billion laughs") expands to gigabytes downstream."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not allowed in a "
                                                              "config file", event.start_mark)
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def _one_line(error: ValidationError, path: Path) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"config {path}: {key}: {msg}{more}"


def load_config_file(model: type[BaseModel], path: str | Path) -> BaseModel:
    """A config model from a YAML or JSON file, every failure a ConfigError naming the file (and the key).

    Refused: a missing or unreadable file, one over ``MAX_CONFIG_BYTES``, invalid or non-UTF-8 text, YAML aliases,
    nesting too deep to parse, a top level that is not a mapping, unknown keys, values of the wrong type (strict
    booleans and whole numbers).
    """
    return validate_config(model, read_config_data(path), path)


def validate_config(model: type[BaseModel], data: dict, path: str | Path) -> BaseModel:
    """``model`` from ``data`` read from ``path``; a validation failure is one ConfigError line naming both."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, Path(path))) from exc


def read_config_data(path: str | Path) -> dict:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON config file, within the limits of ``load_config_file``."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # at most one byte over the limit: a pipe or /dev/zero has no size to stat
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            size = path.stat().st_size
            said = f"{size:,} bytes, over" if size > MAX_CONFIG_BYTES else "more bytes than"
            raise ConfigError(f"config {path}: {said} the {MAX_CONFIG_BYTES:,}-byte limit")
        text = raw.decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config {path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: cannot read ({exc})") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = _yaml(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"config {path}: invalid YAML: {' '.join(str(exc).split())}") from exc
        else:
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"config {path}: invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"config {path}: nested too deeply to be a config") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data
