"""Training of the ranker (models/ranker.py) on ranking examples (tasks/ranking_examples.py).

AdamW on the weighted BCE of the heads, shuffled mini-batches, at most ``epochs`` epochs, early stopping on the mean
head AUC of a validation split (the latest requests of the training window, so the model is never selected on the
holdout the gate judges), keeping the best epoch's weights. One torch thread by default (see TrainConfig).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from towerflow.config import RankerTrainConfig
from towerflow.models.ranker import Ranker, RankerBatch, ranker_loss
from towerflow.progress import say
from towerflow.tasks.evaluate_ranker import evaluate_ranking
from towerflow.tasks.ranking_examples import RankingExamples, latest_requests
from towerflow.tasks.train import EpochStats, Progress, TrainError, torch_threads

STOP_METRIC = "auc/mean"


@dataclass
class RankerTrainResult:
    model: Ranker
    history: list[EpochStats]
    best_epoch: int
    seconds: float


def to_batch(ex: RankingExamples, idx: np.ndarray, dense: np.ndarray | None = None) -> RankerBatch:
    """Rows ``idx`` of the examples (and of their (n, dense_dim) dense features) as tensors."""
    return RankerBatch(
        cand_items=torch.from_numpy(ex.item[idx]), surface=torch.from_numpy(ex.surface[idx]),
        hist_items=torch.from_numpy(ex.hist_items[idx]), hist_actions=torch.from_numpy(ex.hist_actions[idx]),
        hist_age_s=torch.from_numpy(ex.hist_age_s[idx]),
        dense=None if dense is None else torch.from_numpy(np.ascontiguousarray(dense[idx], dtype=np.float32)),
        user_vector=None if ex.user_vector is None else torch.from_numpy(ex.user_vector[idx]))


@torch.no_grad()
def predict(model: Ranker, ex: RankingExamples, dense: np.ndarray | None = None, batch_size: int = 2048) -> np.ndarray:
    """(n, H) head probabilities of every row, in eval mode."""
    was = model.training
    model.eval()
    try:
        out = [torch.sigmoid(model(to_batch(ex, np.arange(a, min(a + batch_size, len(ex))), dense))).numpy()
               for a in range(0, len(ex), batch_size)]
    finally:
        model.train(was)
    return np.concatenate(out) if out else np.zeros((0, model.heads.out_features), dtype=np.float32)


def ranking_score(model: Ranker, ex: RankingExamples, probs: np.ndarray) -> np.ndarray:
    """(n,) the score each request's rows are ranked by (``Ranker.ranking_score``) from their (n, H) ``probs``."""
    uv = None if ex.user_vector is None else torch.from_numpy(ex.user_vector)
    return model.ranking_score(torch.from_numpy(probs), torch.from_numpy(ex.item), uv).numpy()


def evaluate_ranker(model: Ranker, ex: RankingExamples, dense: np.ndarray | None = None) -> dict[str, float]:
    """tasks/evaluate_ranker.py's metrics of the model on ``ex``, ranking each request by ``ranking_score``."""
    probs = predict(model, ex, dense)
    score = ranking_score(model, ex, probs)
    return evaluate_ranking(ex.labels, ex.request, ex.user_id, score, probs)


def train_ranker(examples: RankingExamples, item_vectors: np.ndarray, config: RankerTrainConfig,
                 dense: np.ndarray | None = None, log: bool = True) -> RankerTrainResult:
    """Train a ranker over the release's ``item_vectors`` (n_items + 1, D) on ``examples`` (with their optional
    (n, dense_dim) request features) -> the best epoch's model, in eval mode. Raises TrainError without examples."""
    if len(examples) == 0:
        raise TrainError("train_ranker: no ranking examples")
    if examples.hist_items.shape[1] != config.model.max_seq_len:
        raise TrainError(f"train_ranker: examples hold sequences of {examples.hist_items.shape[1]} actions, the "
                         f"ranker config says max_seq_len {config.model.max_seq_len}; build them with the same S")
    if config.model.retrieval_score and examples.user_vector is None:
        raise TrainError("train_ranker: the ranker config asks for the retrieval score (retrieval_score), but the "
                         "examples hold no user vectors: build them with a retriever (build_ranking_examples)")
    if dense is not None and len(dense) != len(examples):
        raise TrainError(f"train_ranker: {len(dense)} dense rows for {len(examples)} examples")
    if examples.item.max() >= len(item_vectors):
        raise TrainError(f"train_ranker: item index {examples.item.max()} outside the item table "
                         f"({len(item_vectors)} rows): examples and vectors come from different releases")
    late = latest_requests(examples, config.validation_share)
    train_idx, val_idx = np.flatnonzero(~late), np.flatnonzero(late)
    val = examples.take(val_idx)
    val_dense = None if dense is None else dense[val_idx]
    rng = np.random.default_rng(config.seed)
    t_start = time.perf_counter()
    with torch_threads(config.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Ranker(torch.as_tensor(np.asarray(item_vectors, dtype=np.float32)), config.model,
                       0 if dense is None else dense.shape[1])
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        progress = Progress(metric=STOP_METRIC, patience=config.patience)
        for epoch in range(1, config.epochs + 1):
            model.train()
            t0, total, order = time.perf_counter(), 0.0, rng.permutation(train_idx)
            for a in range(0, len(order), config.batch_size):
                idx = order[a : a + config.batch_size]
                loss = ranker_loss(model(to_batch(examples, idx, dense)), torch.from_numpy(examples.labels[idx]),
                                   config.model.loss_weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            seconds = time.perf_counter() - t0
            if not np.isfinite(total):
                raise TrainError(f"train_ranker: loss diverged at epoch {epoch}")
            metrics = evaluate_ranker(model, val, val_dense) if len(val) else {}
            stats = EpochStats(epoch, total / max(len(order), 1), seconds, len(order) / max(seconds, 1e-9),
                               {k: v for k, v in metrics.items() if np.isfinite(v)})
            value, improved = progress.record(stats, model)
            if log:
                say("ranker " + progress.line(stats, config.epochs, value, improved))
            if progress.should_stop(epoch + 1):
                break
        model.load_state_dict(progress.best_state)
    return RankerTrainResult(model.eval(), progress.history, progress.best_epoch, time.perf_counter() - t_start)
