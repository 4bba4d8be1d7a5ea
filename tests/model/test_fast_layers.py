"""models/layers.py's hand-written fast paths (mean_bag, small_embedding, unique_inverse, FastDropout.residual): each
gives what the torch op it replaces gives, forward AND gradient, on values worked out by hand. The bench's loss
curves compare whole runs; these pin each custom backward on its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from towerflow.models.layers import FastDropout, mean_bag, small_embedding, unique_inverse

# rows: 0 padding (zeros), 1 -> [1, 2], 2 -> [3, 4], 3 -> [5, 6]
TABLE = [[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
IDS = torch.tensor([[1, 2, 0], [3, 0, 0], [0, 0, 0], [1, 1, 2]])
# bag means: [2, 3]; [5, 6]; nothing -> [0, 0]; (2 x [1, 2] + [3, 4]) / 3 = [5/3, 8/3]
MEANS = [[2.0, 3.0], [5.0, 6.0], [0.0, 0.0], [5 / 3, 8 / 3]]
GRAD = torch.tensor([[1.0, 10.0], [100.0, 1000.0], [7.0, 7.0], [3.0, 30.0]])
# d/d row: each bag's gradient / its size, once per slot; row 0 (padding) learns nothing, the empty bag gives nothing
# row 1: [1, 10] / 2 + 2 x [3, 30] / 3 = [2.5, 25]; row 2: [1, 10] / 2 + [3, 30] / 3 = [1.5, 15]; row 3: [100, 1000]
ROW_GRADS = [[0.0, 0.0], [2.5, 25.0], [1.5, 15.0], [100.0, 1000.0]]


def test_mean_bag_forward_and_gradient_by_hand():
    w = torch.tensor(TABLE, requires_grad=True)
    out = mean_bag(w, IDS)  # with gradient: the fast kernel and its index_put backward
    torch.testing.assert_close(out, torch.tensor(MEANS))
    out.backward(GRAD)
    torch.testing.assert_close(w.grad, torch.tensor(ROW_GRADS))
    with torch.no_grad():  # a few rows without gradient (serving) take the plain bag: the same means
        torch.testing.assert_close(mean_bag(w, IDS), torch.tensor(MEANS))


def test_mean_bag_equals_embedding_bag_with_padding_on_many_rows():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(50, 4, mode="mean", padding_idx=0)
    ids = torch.randint(0, 50, (100, 6))
    ids[3], ids[5, :4] = 0, 0
    w = bag.weight.detach().clone().requires_grad_(True)
    g = torch.randn(100, 4)
    bag(ids).backward(g)
    out = mean_bag(w, ids)
    out.backward(g)
    torch.testing.assert_close(out, bag(ids))
    torch.testing.assert_close(w.grad, bag.weight.grad)


def test_small_embedding_gradient_by_hand():
    table = nn.Embedding(3, 2, padding_idx=0)
    idx = torch.tensor([[1, 1, 0], [2, 0, 1]])
    out = small_embedding(table, idx)
    torch.testing.assert_close(out, table(idx))
    out.backward(torch.ones(2, 3, 2))
    # row 1 is looked up 3 times, row 2 once; the padding row 0 gets nothing
    torch.testing.assert_close(table.weight.grad, torch.tensor([[0.0, 0.0], [3.0, 3.0], [1.0, 1.0]]))


@pytest.mark.parametrize(("idx", "n_rows", "uniq", "inverse"), [
    ([3, 1, 3, 0], 4, [0, 1, 3], [2, 1, 2, 0]),  # presence-table path (table not much bigger than idx)
    ([3, 1, 3, 0], 1000, [0, 1, 3], [2, 1, 2, 0]),  # a big table: torch.unique
    ([5, 1], 4, [1, 5], [1, 0]),  # outside the table: torch.unique, so the item tower can name the bad index
])
def test_unique_inverse_by_hand(idx, n_rows, uniq, inverse):
    u, inv = unique_inverse(torch.tensor(idx), n_rows)
    assert u.tolist() == uniq and inv.tolist() == inverse


def test_dropout_residual_is_x_plus_scaled_kept_y():
    drop = FastDropout(0.25)  # threshold 64 of 256: keep 3/4, scale 4/3
    x, y = torch.full((200, 50), 2.0), torch.full((200, 50), 3.0)
    drop.eval()
    torch.testing.assert_close(drop.residual(x, y), x + y)
    drop.train()
    out = drop.residual(x, y)
    kept = out != 2.0
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 2.0 + 3.0 * 4 / 3))
    assert 0.72 < float(kept.float().mean()) < 0.78  # 10,000 draws: 0.75, sd 0.004
