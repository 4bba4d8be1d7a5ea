"""Train the two-tower model with in-batch softmax + logQ correction (pure: no Prefect, no MLflow).

The caller gets per-epoch stats through ``on_epoch`` (the Prefect task logs them to MLflow); with a
``checkpoint_dir`` every epoch is checkpointed and a restarted call resumes after the last finished epoch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.frequency import StreamingFrequencyEstimator, exact_log_q
from models.loss import in_batch_softmax_loss, mixed_negatives_log_q
from models.two_tower import TwoTower, load_model, save_model
from tasks.build_examples import Examples
from tasks.scoring import model_metrics
from towerflow.config import TrainConfig
from towerflow.errors import TowerflowError
from towerflow.progress import say


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
    seconds: float
    early_stopping_split: str

    @property
    def examples_per_s(self) -> float:
        return float(np.mean([e.examples_per_s for e in self.history])) if self.history else 0.0

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        save_model(self.model, directory / "model")
        meta = {"history": [asdict(e) for e in self.history], "best_epoch": self.best_epoch,
                "seconds": self.seconds, "early_stopping_split": self.early_stopping_split}
        (directory / "train.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TrainResult:
        directory = Path(directory)
        meta = json.loads((directory / "train.json").read_text())
        return cls(model=load_model(directory / "model"), history=[EpochStats(**e) for e in meta["history"]],
                   best_epoch=meta["best_epoch"], seconds=meta["seconds"],
                   early_stopping_split=meta["early_stopping_split"])


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
) -> TrainResult:
    """Fit a TwoTower on ``examples.train``; early-stop on ``examples.valid`` (or the holdout when there is none).

    Each step: a batch of b examples -> u (b, d), v (b, d) -> softmax over the b in-batch positives (plus
    ``mixed_negatives`` uniform items) with ``logit - log q``, accidental hits masked. Keeps the best epoch's weights.
    ``config.num_threads`` (when set) is torch's intra-op thread count for the call, restored afterwards.
    """
    with torch_threads(config.num_threads):
        return _train(examples, config, checkpoint_dir, on_epoch)


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


def _train(
    examples: Examples,
    config: TrainConfig,
    checkpoint_dir: str | Path | None,
    on_epoch: Callable[[EpochStats], None] | None,
) -> TrainResult:
    n_train = len(examples.train)
    if n_train < 2:
        raise TrainError(f"need at least 2 training examples, got {n_train}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    model = TwoTower(examples.sizes, examples.item_feats, config.model).to(device)
    model.set_log_q(item_log_q(examples, config))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # drop the ragged last batch: one tiny batch gives a noisy in-batch softmax
    n_batches = max(1, n_train // config.batch_size)
    sched = lr_scheduler(opt, config, n_batches)
    split, seen = ("valid", examples.valid_seen) if examples.valid is not None else ("holdout", examples.holdout_seen)
    stop_on = examples.valid if examples.valid is not None else examples.holdout
    metric = config.early_stopping_metric

    history: list[EpochStats] = []
    best_state, best_value, best_epoch, start_epoch = None, -math.inf, 0, 1
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history = [EpochStats(**e) for e in state["history"]]
        best_state, best_value, best_epoch = state["best_state"], state["best_value"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
        say(f"resuming training after epoch {state['epoch']} from {ckpt}")
        for stats in history:  # the caller (e.g. an MLflow run) sees every epoch, not only those run here
            if on_epoch:
                on_epoch(stats)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        if epoch - best_epoch > config.patience and best_epoch > 0:
            break
        model.train()
        t0 = time.perf_counter()
        order = rng.permutation(n_train)
        total, batches = 0.0, 0
        for i in range(n_batches):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            batch = examples.train.to_batch(idx, examples.user_feats).to(device)
            u, v = model(batch)
            loss = batch_loss(model, u, v, batch.target_items, config, config.batch_size)
            if not torch.isfinite(loss):
                raise TrainError(f"loss became {loss.item()} at epoch {epoch}, batch {i}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            batches += 1
        train_s = time.perf_counter() - t0
        metrics = model_metrics(model, stop_on, examples.user_feats, seen, ks=(10, 50)) if len(stop_on) else {}
        stats = EpochStats(epoch=epoch, loss=total / batches, seconds=time.perf_counter() - t0,
                           examples_per_s=batches * config.batch_size / train_s, metrics=metrics)
        history.append(stats)
        value = metrics.get(metric, -stats.loss)
        improved = value > best_value
        if improved:
            best_value, best_epoch = value, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        say(f"epoch {epoch}/{config.epochs}: loss {stats.loss:.4f}  {metric} {value:.4f}{' *' if improved else ''}"
            f"  {stats.examples_per_s:,.0f} ex/s  {stats.seconds:.1f}s")
        if ckpt:  # before on_epoch: a failure there (e.g. logging) must not lose the epoch
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "numpy_rng": rng,
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "history": [asdict(e) for e in history], "best_state": best_state,
                        "best_value": best_value, "best_epoch": best_epoch, "epoch": epoch}, tmp)
            tmp.replace(ckpt)
        if on_epoch:
            on_epoch(stats)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model.cpu(), history=history, best_epoch=best_epoch,
                       seconds=time.perf_counter() - t_start, early_stopping_split=split)
