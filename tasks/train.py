"""Train the two-tower model with in-batch softmax + logQ correction (pure: no Prefect, no MLflow).

The caller gets per-epoch stats through ``on_epoch`` (the Prefect task logs them to MLflow); with a
``checkpoint_dir`` every epoch is checkpointed and a restarted call resumes after the last finished epoch.

The pieces of the loop (``init_model``, ``make_optimizer``, ``run_epoch`` / ``train_step``, ``Progress``,
``run_average`` / ``averaged``, ``save_checkpoint`` / ``load_checkpoint``, ``finish``) are shared with the DDP path
(``tasks.distributed``), so a change to the loss, the step, the schedule, the weight average or early stopping lands
in both.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from towerflow.config import ModelConfig, TrainConfig, check_history_fits_model
from towerflow.errors import TowerflowError
from towerflow.models.averaging import WeightAverage
from towerflow.models.batch import Batch, ItemFeatures
from towerflow.models.frequency import StreamingFrequencyEstimator, exact_log_q
from towerflow.models.loss import in_batch_softmax_loss, mixed_negatives_log_q
from towerflow.models.query import texts_differ
from towerflow.models.two_tower import TwoTower, load_model, save_model
from towerflow.progress import say
from towerflow.tasks.build_examples import Examples, SequenceExamples
from towerflow.tasks.future_targets import future_window, with_future_targets
from towerflow.tasks.history import SeenItems
from towerflow.tasks.refit import refit_examples, refit_wanted
from towerflow.tasks.scoring import model_metrics


class TrainError(TowerflowError):
    """Training cannot start or went wrong (no examples, a diverged loss)."""


@dataclass
class EpochStats:
    epoch: int
    loss: float
    seconds: float
    examples_per_s: float
    metrics: dict[str, float] = field(default_factory=dict)  # on the early-stopping split


@dataclass
class TrainResult:
    model: TwoTower
    history: list[EpochStats]
    best_epoch: int
    seconds: float  # both runs when refit
    early_stopping_split: str
    refit_epochs: int = 0  # > 0: the model is the refit on train + validation for that many epochs (tasks/refit.py)
    refit_history: list[EpochStats] = field(default_factory=list)

    @property
    def examples_per_s(self) -> float:
        return float(np.mean([e.examples_per_s for e in self.history])) if self.history else 0.0

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        save_model(self.model, directory / "model")
        meta = {"history": [asdict(e) for e in self.history], "best_epoch": self.best_epoch,
                "seconds": self.seconds, "early_stopping_split": self.early_stopping_split,
                "refit_epochs": self.refit_epochs, "refit_history": [asdict(e) for e in self.refit_history]}
        (directory / "train.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TrainResult:
        directory = Path(directory)
        meta = json.loads((directory / "train.json").read_text())
        return cls(model=load_model(directory / "model"), history=[EpochStats(**e) for e in meta["history"]],
                   best_epoch=meta["best_epoch"], seconds=meta["seconds"],
                   early_stopping_split=meta["early_stopping_split"], refit_epochs=meta.get("refit_epochs", 0),
                   refit_history=[EpochStats(**e) for e in meta.get("refit_history", [])])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("device 'cuda' requested but no GPU is available")
    return torch.device(name)


def item_log_q(examples: Examples, config: TrainConfig) -> torch.Tensor:
    """log q per item index (n_items + 1,): the chance one training example's positive is that item."""
    n = examples.vocab.n_items
    targets = torch.from_numpy(examples.train.target_items)
    if config.q_estimator == "exact":
        return exact_log_q(torch.bincount(targets, minlength=n + 1).float())
    est = StreamingFrequencyEstimator(n_buckets=max(1024, 4 * (n + 1)), seed=config.seed)
    for step, chunk in enumerate(targets.split(config.batch_size)):
        est.update(chunk, step)
    return est.table(n)


def batch_loss(
    model: TwoTower, u: torch.Tensor, v: torch.Tensor, target_items: torch.Tensor, config: TrainConfig,
    batch_size: int,
) -> torch.Tensor:
    """In-batch softmax loss with logQ (and ``config.mixed_negatives``) of u (b, d) against v (b, d) -> scalar.

    ``target_items`` (b,) are v's item indices. ``batch_size`` is the number of in-batch candidates q is scaled
    to: the batch of this process, or the global batch when u and v were gathered across DDP ranks.
    """
    n_items = model.sizes.n_items
    # q per draw -> expected copies among b in-batch candidates (same unit as the uniform negatives)
    log_q = model.log_q[target_items] + math.log(batch_size) if config.logq else None
    neg = {}
    if config.mixed_negatives:
        device = u.device
        neg_ids = torch.randint(1, n_items + 1, (config.mixed_negatives,), device=device)
        neg_lq = torch.full((config.mixed_negatives,), mixed_negatives_log_q(config.mixed_negatives, n_items),
                            device=device)
        neg = {"neg_v": model.item_vectors(neg_ids), "neg_ids": neg_ids,
               "neg_log_q": neg_lq if config.logq else None}
    return in_batch_softmax_loss(u, v, target_items, log_q, config.temperature, **neg)


def lr_scheduler(
    opt: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule over ``config.epochs * steps_per_epoch`` steps (call ``step()`` after each).

    ``cosine``: linear warm-up over the first ``config.warmup`` share of the steps, then cosine decay to 0 at the
    last epoch; ``constant``: ``config.lr`` throughout. The decay is why a short run (few epochs, e.g. the demo)
    ends well trained: the last epochs take small steps instead of bouncing around at full rate.
    """
    total = max(1, config.epochs * steps_per_epoch)
    warm = max(1, round(config.warmup * total))

    def factor(step: int) -> float:
        if config.lr_schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(
    examples: Examples,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_refit_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Fit a TwoTower on ``examples.train``; early-stop on ``examples.valid`` (or the holdout when there is none).

    Each step: a batch of b examples -> u (b, d), v (b, d) -> softmax over the b in-batch positives (plus
    ``mixed_negatives`` uniform items) with ``logit - log q``, accidental hits masked. Keeps the best epoch's weights,
    or, when ``config.refit`` resolves on (tasks/refit.py), the model refit from scratch on train + validation rows
    for the best epoch count (its epochs go to ``on_refit_epoch``; the refit is not checkpointed: a restart redoes it).
    ``config.num_threads`` (when set) is torch's intra-op thread count for the call, restored afterwards.
    """
    with torch_threads(config.num_threads):
        result = _train(examples, config, checkpoint_dir, on_epoch)
        wanted, why = refit_wanted(config, examples)
        say(why)
        if wanted and result.best_epoch > 0:
            t0 = time.perf_counter()
            result.model, result.refit_history = refit(examples, config, result.best_epoch, on_refit_epoch)
            result.refit_epochs = result.best_epoch
            result.seconds += time.perf_counter() - t0
        return result


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (None: leave torch's setting), then restore it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Progress:
    """The epochs run so far and the best of them: when to stop early and which weights to keep.

    Kept in the checkpoint, so a resumed run stops at the same epoch and keeps the same weights as an unbroken one.
    """

    metric: str  # config.early_stopping_metric; -loss when the split gives no metrics
    patience: int
    history: list[EpochStats] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_value: float = -math.inf
    best_epoch: int = 0

    def should_stop(self, epoch: int) -> bool:
        """True when ``epoch`` comes more than ``patience`` epochs after the best one."""
        return self.best_epoch > 0 and epoch - self.best_epoch > self.patience

    def record(self, stats: EpochStats, model: torch.nn.Module) -> tuple[float, bool]:
        """Add an epoch; copy ``model``'s weights when it is the best so far -> (its watched value, improved)."""
        self.history.append(stats)
        value = stats.metrics.get(self.metric, -stats.loss)
        improved = value > self.best_value
        if improved:
            self.best_value, self.best_epoch = value, stats.epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return value, improved

    def line(self, stats: EpochStats, epochs: int, value: float, improved: bool, ranks: str = "") -> str:
        """The progress line of one epoch (``ranks``: e.g. " (2 ranks)")."""
        return (f"epoch {stats.epoch}/{epochs}{ranks}: loss {stats.loss:.4f}  {self.metric} {value:.4f}"
                f"{' *' if improved else ''}  {stats.examples_per_s:,.0f} ex/s  {stats.seconds:.1f}s")


def stopping_split(examples: Examples) -> tuple[str, SequenceExamples, SeenItems]:
    """The split early stopping watches: (name, rows, their seen items); ``valid`` or, without one, the holdout."""
    if examples.valid is not None:
        return "valid", examples.valid, examples.valid_seen
    return "holdout", examples.holdout, examples.holdout_seen


def training_rows(examples: Examples, config: TrainConfig, main: bool = True) -> Examples:
    """``examples`` whose ``train`` rows also carry each history's next targets (``config.future_targets``,
    tasks/future_targets.py; what auto chose is said on the ``main`` process). The other splits are unchanged."""
    n, why = future_window(config.future_targets, examples.meta.get("split"))
    if why and main:
        say(why)
    return examples if n == 1 else replace(examples, train=with_future_targets(examples.train, n))


AVERAGE_EPOCHS = 2.5  # what average_epochs "auto" means where it averages


def averaging_epochs(config: TrainConfig, split: str | None) -> tuple[float, str | None]:
    """``config.average_epochs`` resolved for examples cut by ``split`` -> (epochs, why auto chose them or None).

    auto averages on a leave-one-out split (data spread over months, a validation split of one target per user whose
    noise the average smooths) and not on a time split (a daily cadence, where the average's lag costs fresh items).
    """
    if config.average_epochs != "auto":
        return float(config.average_epochs), None
    if split == "leave_one_out":
        return AVERAGE_EPOCHS, (f"average_epochs auto -> {AVERAGE_EPOCHS} (leave-one-out split: epochs judged with a "
                                f"moving average of the weights)")
    return 0.0, f"average_epochs auto -> 0 ({split or 'unknown'} split: epochs judged with the live weights)"


def weight_average(
    model: TwoTower, epochs: float, steps_per_epoch: int, state: dict | None
) -> WeightAverage | None:
    """The run's average of ``model``'s weights over ``epochs`` epochs of steps (None when that is 0), restored from
    a checkpoint's ``state`` when it holds one (a checkpoint written without it starts at the restored weights)."""
    if not epochs:
        return None
    average = WeightAverage(model, max(1.0, epochs * steps_per_epoch))
    if state is not None and state.get("average") is not None:
        average.load_state_dict(state["average"])
    return average


def run_average(
    model: TwoTower, examples: Examples, config: TrainConfig, steps_per_epoch: int, state: dict | None, main: bool
) -> WeightAverage | None:
    """``weight_average`` for a training run on ``examples``: ``averaging_epochs`` of their split, said (by the
    ``main`` process) when auto chose."""
    epochs, why = averaging_epochs(config, examples.meta.get("split"))
    if why and main:
        say(why)
    return weight_average(model, epochs, steps_per_epoch, state)


def averaged(average: WeightAverage | None) -> AbstractContextManager:
    """The block in which an epoch is judged and its weights kept: the averaged weights when there is an average."""
    return average.applied() if average is not None else nullcontext()


def stopping_metrics(model: TwoTower, examples: Examples) -> dict[str, float]:
    """recall / ndcg at 10 and 50 on the early-stopping split ({} when it is empty)."""
    _, rows, seen = stopping_split(examples)
    return model_metrics(model, rows, examples.user_feats, seen, ks=(10, 50)) if len(rows) else {}


def save_checkpoint(
    path: Path, model: TwoTower, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress, epoch: int, **extra: object,
) -> None:
    """Write everything a restart needs after ``epoch`` (``extra``: e.g. RNG states) to ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                **extra, "history": [asdict(e) for e in progress.history], "best_state": progress.best_state,
                "best_value": progress.best_value, "best_epoch": progress.best_epoch, "epoch": epoch}, tmp)
    tmp.replace(path)


def load_checkpoint(
    path: Path, device: torch.device, model: TwoTower, opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler, progress: Progress,
) -> dict:
    """Restore model, optimizer, schedule and ``progress`` from ``save_checkpoint``'s file -> the raw state
    (its ``epoch`` and any ``extra``)."""
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    progress.history = [EpochStats(**e) for e in state["history"]]
    progress.best_state, progress.best_value = state["best_state"], state["best_value"]
    progress.best_epoch = state["best_epoch"]
    return state


def resume(
    checkpoint_dir: str | Path | None, device: torch.device, model: TwoTower, opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler, progress: Progress,
    on_epoch: Callable[[EpochStats], None] | None, label: str = "training", main: bool = True,
) -> tuple[Path | None, dict | None]:
    """The checkpoint path under ``checkpoint_dir`` and, when a checkpoint is there, its restored state.

    Restores through ``load_checkpoint``, says so and replays the epochs already run to ``on_epoch`` (the caller,
    e.g. an MLflow run, sees every epoch, not only those run here). ``main=False`` (DDP ranks other than 0)
    restores silently. -> (path or None without a directory, the raw state or None for a fresh start).
    """
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    if ckpt is None or not ckpt.exists():
        return ckpt, None
    state = load_checkpoint(ckpt, device, model, opt, sched, progress)
    if main:
        say(f"resuming {label} after epoch {state['epoch']} from {ckpt}")
        if on_epoch:
            for stats in progress.history:
                on_epoch(stats)
    return ckpt, state


def has_item_features(features: ItemFeatures) -> bool:
    """Whether the catalog's features tell any two items apart (row 0 is padding): more than one category, genre
    list or dense vector among the items. One shared value (an importer's ``unknown`` category) tells nothing."""
    rows = [features.category[1:, None], features.genres[1:]]
    if features.dense is not None:
        rows.append(features.dense[1:])
    return any(len(r) > 1 and bool((r != r[:1]).any()) for r in rows)


def fit_model_config(examples: Examples, model: ModelConfig) -> tuple[ModelConfig, str | None]:
    """The model config for this data -> (config, why it differs from ``model``, or None).

    ``id_dropout`` teaches the item tower to place an item from its features alone (items added after training).
    A catalog without features (a plain ``user,item,timestamp`` file) has nothing to learn that from: a dropped id
    leaves the same constant vector for every item, noise in histories and targets alike, so it is turned off
    (MovieLens-100K implicit, bench/public_path.py's split, one run each: validation HR@10 0.166 with it, 0.194 without;
    runs vary by about 0.02). Likewise ``use_query`` needs item texts that tell items apart: with one shared text
    (the importer's ``unknown`` category) a query can match nothing, and the text path only costs training time.
    """
    changes, why = {}, []
    if model.id_dropout > 0 and not has_item_features(examples.item_feats):
        changes["id_dropout"] = 0.0
        why.append(f"the catalog has no item features: id_dropout {model.id_dropout} -> 0 (nothing to learn "
                   f"feature-only item vectors from)")
    if model.use_query and not texts_differ(examples.item_text or []):
        changes["use_query"] = False
        why.append("the items' titles and categories are all the same: use_query -> False (a search query "
                   "would have no item text to match)")
    if not changes:
        return model, None
    return model.model_copy(update=changes), "; ".join(why)


def init_model(examples: Examples, config: TrainConfig, device: torch.device) -> TwoTower:
    """Fresh TwoTower weights from ``config.seed`` (the same on every DDP rank), with ``item_log_q`` set; the model
    config adapted to the data by ``fit_model_config`` (and said so)."""
    try:
        check_history_fits_model(examples.train.max_seq_len,
                                 int(examples.meta.get("gap_buckets", config.model.gap_buckets)), config.model)
    except ValueError as exc:
        raise TrainError(f"the examples do not fit the model: {exc}") from exc
    model_config, why = fit_model_config(examples, config.model)
    if why:
        say(why)
    torch.manual_seed(config.seed)
    model = TwoTower(examples.sizes, examples.item_feats, model_config).to(device)
    model.set_log_q(item_log_q(examples, config))
    return model


def make_optimizer(
    model: TwoTower, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s parameters and its ``lr_scheduler``: one place, so every training path steps alike.

    Fused (one kernel over all parameters) on CPU and CUDA: torch's default on CPU is a Python loop of about ten ops
    per parameter, which over the 16k-row query table cost 4-5 ms of a 40 ms step (bench/train_throughput.py);
    the update is the same AdamW.
    """
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    return opt, lr_scheduler(opt, config, steps_per_epoch)


def train_step(
    loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, where: str
) -> None:
    """One optimizer step on a scalar ``loss`` and one scheduler step; refuses a non-finite loss (``where`` names
    the step in the error). Under DDP, ``backward`` also averages the gradients across ranks."""
    if not torch.isfinite(loss):
        raise TrainError(f"loss became {loss.item()} at {where}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def run_epoch(
    examples: Examples,
    order: np.ndarray,
    batch_size: int,
    n_batches: int,
    forward: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    where: str,
    average: WeightAverage | None = None,
) -> torch.Tensor:
    """``n_batches`` steps over ``examples.train`` rows ``order[i * batch_size : (i + 1) * batch_size]``.

    ``forward`` maps a batch to u (b, d), v (b, d) (the model, or its DDP wrapper); ``loss_fn(u, v, target_items)``
    gives the scalar loss (``batch_loss``, or the global-batch loss under DDP); ``average`` (when given) is updated
    after every step. Returns the sum of the steps' losses as a float64 scalar on ``device``, so a GPU run needs no
    host round trip per step to keep it.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(n_batches):
        idx = order[i * batch_size : (i + 1) * batch_size]
        batch = examples.train.to_batch(idx, examples.user_feats).to(device)
        u, v = forward(batch)
        loss = loss_fn(u, v, batch.target_items)
        train_step(loss, opt, sched, f"{where}, batch {i}")
        if average is not None:
            average.update()
        total += loss.detach().double()
    return total


def _fresh_run(examples: Examples, config: TrainConfig) -> tuple[
    np.random.Generator, torch.device, TwoTower, int, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
    Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
]:
    """What a training run starts from, the same for ``_train`` and ``refit``: (the batch-order rng, device, a freshly
    initialised model, batches per epoch, optimizer, schedule, the batch loss)."""
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    model = init_model(examples, config, device)
    # drop the ragged last batch: one tiny batch gives a noisy in-batch softmax
    n_batches = max(1, len(examples.train) // config.batch_size)
    opt, sched = make_optimizer(model, config, n_batches)

    def loss_fn(u: torch.Tensor, v: torch.Tensor, target_items: torch.Tensor) -> torch.Tensor:
        return batch_loss(model, u, v, target_items, config, config.batch_size)

    return rng, device, model, n_batches, opt, sched, loss_fn


def _train(
    examples: Examples,
    config: TrainConfig,
    checkpoint_dir: str | Path | None,
    on_epoch: Callable[[EpochStats], None] | None,
) -> TrainResult:
    examples = training_rows(examples, config)
    n_train = len(examples.train)
    if n_train < 2:
        raise TrainError(f"need at least 2 training examples, got {n_train}")
    rng, device, model, n_batches, opt, sched, loss_fn = _fresh_run(examples, config)
    progress = Progress(config.early_stopping_metric, config.patience)

    start_epoch = 1
    ckpt, state = resume(checkpoint_dir, device, model, opt, sched, progress, on_epoch)
    if state is not None:
        rng = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_epoch = state["epoch"] + 1
    average = run_average(model, examples, config, n_batches, state, main=True)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        if progress.should_stop(epoch):
            break
        model.train()
        t0 = time.perf_counter()
        total = run_epoch(examples, rng.permutation(n_train), config.batch_size, n_batches, model, loss_fn, opt,
                          sched, device, f"epoch {epoch}", average)
        train_s = time.perf_counter() - t0
        with averaged(average):
            metrics = stopping_metrics(model, examples)
            stats = EpochStats(epoch=epoch, loss=float(total) / n_batches, seconds=time.perf_counter() - t0,
                               examples_per_s=n_batches * config.batch_size / train_s, metrics=metrics)
            value, improved = progress.record(stats, model)
        say(progress.line(stats, config.epochs, value, improved))
        if ckpt:  # before on_epoch: a failure there (e.g. logging) must not lose the epoch
            save_checkpoint(ckpt, model, opt, sched, progress, epoch,
                            average=average.state_dict() if average else None, numpy_rng=rng,
                            torch_rng=torch.get_rng_state(),
                            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        if on_epoch:
            on_epoch(stats)
    return finish(model, progress, t_start, stopping_split(examples)[0])


def refit(
    examples: Examples, config: TrainConfig, epochs: int, on_epoch: Callable[[EpochStats], None] | None = None,
) -> tuple[TwoTower, list[EpochStats]]:
    """A fresh model trained ``epochs`` epochs on ``refit_examples(examples)`` -> (model in eval mode on CPU, its
    per-epoch stats). Same seed, schedule (over ``config.epochs``) and weight averaging as ``train``; tasks/refit.py
    says why and on which rows."""
    examples = training_rows(refit_examples(examples), config, main=False)
    n_train = len(examples.train)
    rng, device, model, n_batches, opt, sched, loss_fn = _fresh_run(examples, config)
    average = run_average(model, examples, config, n_batches, None, main=False)
    say(f"refit on train + validation: {epochs} epochs, {n_train:,} rows")

    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total = run_epoch(examples, rng.permutation(n_train), config.batch_size, n_batches, model, loss_fn, opt,
                          sched, device, f"refit epoch {epoch}", average)
        seconds = time.perf_counter() - t0
        stats = EpochStats(epoch=epoch, loss=float(total) / n_batches, seconds=seconds,
                           examples_per_s=n_batches * config.batch_size / seconds)
        history.append(stats)
        say(f"refit epoch {epoch}/{epochs}: loss {stats.loss:.4f}  {stats.examples_per_s:,.0f} ex/s  {seconds:.1f}s")
        if on_epoch:
            on_epoch(stats)
    with averaged(average):  # the weights an epoch is judged with in the first run: the average when there is one
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(final)
    return model.eval().cpu(), history


def finish(model: TwoTower, progress: Progress, t_start: float, split: str) -> TrainResult:
    """Load the best epoch's weights (eval mode, on CPU) into the TrainResult."""
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    model.eval()
    return TrainResult(model=model.cpu(), history=progress.history, best_epoch=progress.best_epoch,
                       seconds=time.perf_counter() - t_start, early_stopping_split=split)
