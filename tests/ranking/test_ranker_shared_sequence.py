"""The serving path of the ranker (one sequence, many candidates: TransAct.forward_shared) gives what the batch
path (the sequence repeated per row, as training and evaluation run it) gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towerflow.config import RankerConfig
from towerflow.models.ranker import Ranker, RankerBatch, score_candidates
from towerflow.models.transact import TransAct


def _model(seed: int = 0, **overrides) -> Ranker:
    torch.manual_seed(seed)
    cfg = RankerConfig(**{"max_seq_len": 12, "latest_k": 3, "action_dim": 4, "item_dim": 6, "mlp_hidden": (8,),
                          "dropout": 0.0, "cross_rank": 4, **overrides})
    return Ranker(torch.randn(31, 7), cfg, dense_dim=2).eval()


def _both(model: Ranker, actions: np.ndarray, n_cand: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared path, batch path) outputs of the sequence module for ``n_cand`` candidates."""
    rng = np.random.default_rng(1)
    s = len(actions)
    items = torch.as_tensor(np.where(actions > 0, rng.integers(1, 31, s), 0))
    acts = torch.as_tensor(actions)
    cand = model.item_repr(torch.as_tensor(rng.integers(1, 31, n_cand)))
    with torch.no_grad():
        seq = model.item_repr(items)
        shared = model.sequence.forward_shared(acts, seq, cand)
        batch = model.sequence(acts[None].expand(n_cand, -1), seq[None].expand(n_cand, -1, -1), cand,
                               torch.zeros((n_cand, s)))
    return shared, batch


@pytest.mark.parametrize(("overrides", "actions"), [
    ({}, np.array([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6])),  # a full sequence
    ({}, np.array([0, 0, 0, 0, 0, 2, 1, 6, 3, 4, 5, 1])),  # leading padding (dropped, latest K kept)
    ({}, np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 5])),  # fewer actions than K
    ({"n_heads": 2}, np.array([0, 0, 3, 1, 2, 6, 1, 6, 3, 4, 5, 1])),
    ({"n_layers": 3}, np.array([0, 0, 3, 1, 2, 6, 1, 6, 3, 4, 5, 1])),
])
def test_shared_sequence_equals_the_batch_path(overrides, actions, monkeypatch):
    monkeypatch.setattr(TransAct, "TOKEN_BLOCK", 5 * len(actions))  # blocks of 5 candidates: 23 = 4 x 5 + 3
    shared, batch = _both(_model(**overrides), actions)
    assert shared.shape == batch.shape == (23, 4 * 16)  # (1 + K) x d_model, d_model = 4 + 2 x 6
    torch.testing.assert_close(shared, batch, atol=1e-5, rtol=1e-5)


def test_no_action_gives_zeros_as_the_batch_path():
    shared, batch = _both(_model(), np.zeros(12, dtype=np.int64))
    assert float(shared.abs().max()) == 0.0
    torch.testing.assert_close(shared, batch)


def test_logits_too_large_for_the_split_softmax_fall_back_to_the_plain_path(monkeypatch):
    model = _model()
    calls = []
    plain = TransAct._forward_plain
    monkeypatch.setattr(TransAct, "_forward_plain", lambda self, *a: calls.append(1) or plain(self, *a))
    with torch.no_grad():
        model.sequence.encoder.layers[0].self_attn.in_proj_weight.mul_(60.0)  # scores of thousands: exp underflows
    shared, batch = _both(model, np.array([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]))
    assert calls == [1] and torch.isfinite(shared).all()
    torch.testing.assert_close(shared, batch, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("affinity", [True, False])
def test_score_candidates_equals_scoring_the_rows_one_by_one(affinity):
    model = _model(affinity_features=affinity)
    assert model.affinity is affinity  # the shared path's affinity (one (1, S) sequence) equals the per-row one
    rng = np.random.default_rng(2)
    cand = rng.integers(1, 31, 17)
    hist_items, hist_actions = rng.integers(1, 31, 12), rng.integers(1, 7, 12)
    hist_items[:4] = hist_actions[:4] = 0
    age, dense = np.arange(12, 0, -1).astype(np.float32), np.array([0.5, -1.0], dtype=np.float32)
    probs, score = score_candidates(model, cand, 1, hist_items, hist_actions, age, dense)
    with torch.no_grad():
        rows = RankerBatch(torch.as_tensor(cand), torch.ones(17, dtype=torch.int64),
                           torch.as_tensor(hist_items)[None].repeat(17, 1),
                           torch.as_tensor(hist_actions)[None].repeat(17, 1),
                           torch.as_tensor(age)[None].repeat(17, 1), torch.as_tensor(dense)[None].repeat(17, 1))
        expected = torch.sigmoid(model(rows)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert score.shape == (17,)
