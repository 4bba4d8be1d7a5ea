"""The TransAct + DCN v2 ranker: cross layers, padding, the time-window mask, loss, blended score, save / load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from towerflow.config import RankerConfig
from towerflow.models.dcn import CrossLayer, DCNv2
from towerflow.models.ranker import (
    Ranker,
    RankerBatch,
    RankerFileError,
    blended_score,
    load_ranker,
    ranker_loss,
    save_ranker,
    score_candidates,
)
from towerflow.models.transact import window_mask
from towerflow.tasks.history import ACTION_INDEX

SMALL = RankerConfig(max_seq_len=6, latest_k=2, action_dim=2, item_dim=3, mlp_hidden=(8,), dropout=0.0)


def _table(n: int = 12, d: int = 5) -> torch.Tensor:
    return torch.randn(n + 1, d, generator=torch.Generator().manual_seed(0))


def _batch(items, actions, ages=None, cand=(1,), surface=(0,)) -> RankerBatch:
    items, actions = torch.tensor(items), torch.tensor(actions)
    ages = torch.zeros(items.shape, dtype=torch.float32) if ages is None else torch.tensor(ages, dtype=torch.float32)
    return RankerBatch(torch.tensor(cand), torch.tensor(surface), items, actions, ages)


def test_cross_layer_by_hand():
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.w.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        layer.w.bias.copy_(torch.tensor([0.5, 0.0]))
    # x0 * (W x + b) + x = [1, 2] * [3.5, 8] + [3, 4]
    assert layer(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])).tolist() == [[6.5, 20.0]]
    low = CrossLayer(2, rank=1)
    with torch.no_grad():
        low.w[0].weight.copy_(torch.tensor([[1.0, 1.0]]))  # V^T: x -> 7
        low.w[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))  # U: 7 -> [7, -7]
        low.w[1].bias.zero_()
    assert low(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])).tolist() == [[10.0, -10.0]]
    assert sum(p.numel() for p in low.parameters()) == 2 + 2 + 2


def test_dcn_structures():
    x = torch.randn(4, 6)
    par = DCNv2(6, 2, None, (5, 3), "parallel", 0.0)
    stacked = DCNv2(6, 2, 2, (5, 3), "stacked", 0.0)
    assert par(x).shape == (4, 6 + 3) and par.out_dim == 9
    assert stacked(x).shape == (4, 3) and stacked.out_dim == 3
    with pytest.raises(ValueError, match="parallel' or 'stacked"):
        DCNv2(6, 1, None, (3,), "both", 0.0)


def test_padding_never_collides_with_an_action_and_is_ignored():
    assert min(ACTION_INDEX.values()) == 1  # 0 is free for padding
    torch.manual_seed(0)
    model = Ranker(_table(), SMALL).eval()
    a = model(_batch([[0, 0, 0, 0, 3, 4]], [[0, 0, 0, 0, 2, 6]]))
    # different item ids under padding, more padding in front (trimmed), and a longer row beside it: same output
    b = model(_batch([[7, 9, 0, 0, 3, 4]], [[0, 0, 0, 0, 2, 6]]))
    c = model(_batch([[0] * 8 + [3, 4]], [[0] * 8 + [2, 6]]))
    d = model(_batch([[0, 0, 0, 0, 3, 4], [1, 2, 3, 4, 5, 6]], [[0, 0, 0, 0, 2, 6], [2] * 6], cand=(1, 1),
                     surface=(0, 0)))
    for other in (b, c, d[:1]):
        torch.testing.assert_close(other, a, atol=1e-5, rtol=1e-5)
    assert not torch.equal(d[1], a[0])  # the history does matter
    empty = model(_batch([[0] * 6], [[0] * 6]))
    assert torch.isfinite(empty).all()


def test_window_mask_hides_the_latest_actions_in_training_only():
    age = torch.tensor([[500.0, 50.0, 5.0, 0.0]])
    valid = torch.tensor([[True, True, True, True]])
    assert window_mask(age, valid, 1e-3, 1.0).tolist() == [[True, True, True, False]]
    assert window_mask(age, valid, 1e9, 1.0).tolist() == [[False] * 4]
    assert window_mask(age, valid, 1e9, 0.0).tolist() == [[True] * 4]
    torch.manual_seed(1)
    masks = window_mask(age.expand(2000, 4), valid.expand(2000, 4), 100.0, 0.5)
    # w ~ U(0, 100) on half the rows: age 0 hidden on ~half, age 5 on ~47.5%, age 50 on ~25%, age 500 never
    hidden = 1 - masks.float().mean(dim=0)
    assert hidden[0] == 0 and abs(hidden[1] - 0.25) < 0.04 and abs(hidden[2] - 0.475) < 0.04
    assert abs(hidden[3] - 0.5) < 0.04
    cfg = SMALL.model_copy(update={"time_window_s": 1e9, "time_window_prob": 1.0})
    model = Ranker(_table(), cfg).eval()
    batch = _batch([[1, 2, 3, 4, 5, 6]], [[2] * 6], ages=[[6, 5, 4, 3, 2, 1]])
    torch.testing.assert_close(model(batch), model(batch))  # eval: no mask, deterministic
    model.train()
    no_history = model(_batch([[0] * 6], [[0] * 6]))
    torch.testing.assert_close(model(batch), no_history)  # training: everything inside the window is hidden


def test_loss_and_blended_score_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0, 5.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]])
    weights = {"click": 2.0, "save": 1.0, "conversion": 1.0, "skip": 1.0}  # hide absent: weight 0
    expected = (2 * -math.log(0.75) + 3 * math.log(2.0)) / 5
    assert ranker_loss(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    probs = torch.tensor([[0.5, 0.2, 0.1, 0.4, 0.3]])
    # 1 x 0.5 + 2 x 0.2 + 3 x 0.1 - 0.5 x 0.4 - 3 x 0.3
    assert blended_score(probs, RankerConfig().score_weights).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown head"):
        RankerConfig(score_weights={"repin": 1.0})
    with pytest.raises(ValueError, match="latest_k"):
        RankerConfig(max_seq_len=4, latest_k=5)


def test_score_candidates_matches_the_batched_model():
    torch.manual_seed(0)
    model = Ranker(_table(), SMALL.model_copy(update={"item_id_embedding": True}), dense_dim=2).eval()
    hist_items, hist_actions, age = np.array([0, 0, 3, 4, 5, 6]), np.array([0, 0, 2, 6, 2, 3]), np.arange(6.0)[::-1]
    full_age = torch.tensor(age.copy(), dtype=torch.float32)
    cand, dense = np.array([1, 7, 9]), np.array([0.5, -1.0], dtype=np.float32)
    probs, scores = score_candidates(model, cand, 2, hist_items, hist_actions, age, dense)
    full = RankerBatch(torch.tensor(cand), torch.full((3,), 2), torch.tensor(hist_items).repeat(3, 1),
                       torch.tensor(hist_actions).repeat(3, 1), full_age.repeat(3, 1),
                       torch.tensor(dense).repeat(3, 1))
    expected = torch.sigmoid(model(full))
    np.testing.assert_allclose(probs, expected.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(scores, blended_score(expected, model.cfg.score_weights).detach().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="dense features of width 2"):
        model(RankerBatch(full.cand_items, full.surface, full.hist_items, full.hist_actions, full.hist_age_s))


def test_save_load_is_bound_to_the_release_table(tmp_path):
    torch.manual_seed(0)
    table = _table()
    model = Ranker(table, SMALL.model_copy(update={"cross_rank": 2, "structure": "stacked"})).eval()
    save_ranker(model, tmp_path / "r", release_id="rel-1")
    back = load_ranker(tmp_path / "r", table.numpy(), release_id="rel-1")
    batch = _batch([[0, 0, 1, 2, 3, 4]], [[0, 0, 2, 2, 5, 6]])
    torch.testing.assert_close(back(batch), model(batch))
    with pytest.raises(RankerFileError, match="ranker of release rel-1, not of release rel-2"):
        load_ranker(tmp_path / "r", table, release_id="rel-2")
    other = table.clone()
    other[3, 0] += 1e-3
    with pytest.raises(RankerFileError, match="not the table the ranker was trained on"):
        load_ranker(tmp_path / "r", other)
