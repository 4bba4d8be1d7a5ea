"""Training the ranker on small hand-made slates: it learns what its inputs carry, and only that."""

from __future__ import annotations

import numpy as np
import pytest

from towerflow.config import RANKER_HEADS, RankerConfig, RankerTrainConfig
from towerflow.tasks.ranking_examples import RankingExamples
from towerflow.tasks.train import TrainError
from towerflow.tasks.train_ranker import predict, train_ranker

CLICK, HIDE = RANKER_HEADS.index("click"), RANKER_HEADS.index("hide")
N_ITEMS, S = 12, 4


def _slates(n_requests: int = 400, per: int = 6, seed: int = 0) -> RankingExamples:
    """Clicks when the candidate's parity matches the latest action's item (only the sequence tells); hides on
    items 11 and 12 (the candidate alone tells)."""
    rng = np.random.default_rng(seed)
    n = n_requests * per
    hist_items = np.repeat(rng.integers(1, N_ITEMS + 1, (n_requests, S)), per, axis=0)
    item = rng.integers(1, N_ITEMS + 1, n)
    labels = np.zeros((n, len(RANKER_HEADS)), dtype=np.float32)
    labels[:, CLICK] = (item % 2) == (hist_items[:, -1] % 2)
    labels[:, HIDE] = item > 10
    return RankingExamples(
        request=np.repeat(np.arange(n_requests), per), user_id=np.repeat(rng.integers(1, 50, n_requests), per),
        ts_us=np.repeat(np.arange(n_requests) * 10**6, per), surface=np.zeros(n, dtype=np.int64),
        item=item.astype(np.int64), labels=labels, hist_items=hist_items.astype(np.int64),
        hist_actions=np.full((n, S), 2, dtype=np.int64), hist_age_s=np.full((n, S), 1e5, dtype=np.float32))


def _table() -> np.ndarray:
    t = np.random.default_rng(1).normal(size=(N_ITEMS + 1, 3)).astype(np.float32)
    t[:, 0] = np.where(np.arange(N_ITEMS + 1) % 2 == 0, 1.0, -1.0)  # parity is in the item vector
    t[0] = 0
    return t


def _config(use_sequence: bool) -> RankerTrainConfig:
    model = RankerConfig(max_seq_len=S, latest_k=2, action_dim=2, item_dim=4, mlp_hidden=(16,), dropout=0.0,
                         time_window_prob=0.0, use_sequence=use_sequence)
    return RankerTrainConfig(model=model, epochs=8, batch_size=128, lr=1e-2, patience=8)


def _auc(ex: RankingExamples, probs: np.ndarray, head: int) -> float:
    from towerflow.tasks.evaluate_ranker import auc

    return auc(ex.labels[:, head], probs[:, head])


def test_the_sequence_ranker_learns_what_only_the_sequence_tells():
    train, test = _slates(seed=0), _slates(100, seed=1)
    seq = train_ranker(train, _table(), _config(True), log=False)
    flat = train_ranker(train, _table(), _config(False), log=False)
    p_seq, p_flat = predict(seq.model, test), predict(flat.model, test)
    assert _auc(test, p_seq, CLICK) > 0.95  # parity of the latest action vs the candidate's
    assert abs(_auc(test, p_flat, CLICK) - 0.5) < 0.1  # without the sequence it cannot be told
    assert _auc(test, p_seq, HIDE) > 0.9 and _auc(test, p_flat, HIDE) > 0.9  # the candidate alone tells
    assert 1 <= seq.best_epoch <= 8 and len(seq.history) >= seq.best_epoch
    assert not seq.model.training


def test_training_is_deterministic_per_seed_and_checks_its_inputs():
    train = _slates(60)
    a = predict(train_ranker(train, _table(), _config(True).model_copy(update={"epochs": 1}), log=False).model, train)
    b = predict(train_ranker(train, _table(), _config(True).model_copy(update={"epochs": 1}), log=False).model, train)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TrainError, match="outside the item table"):
        train_ranker(train, _table()[:5], _config(True), log=False)
    with pytest.raises(TrainError, match="no ranking examples"):
        train_ranker(train.take(np.zeros(len(train), bool)), _table(), _config(True), log=False)
    with pytest.raises(TrainError, match="sequences of 4 actions, the ranker config says max_seq_len 5"):
        bad = _config(True)
        train_ranker(train, _table(), bad.model_copy(update={"model": bad.model.model_copy(update={"max_seq_len": 5})}),
                     log=False)
    with pytest.raises(TrainError, match="dense rows"):
        train_ranker(train, _table(), _config(True), dense=np.zeros((3, 2)), log=False)
