"""The towers: shapes, unit norms, id-less items, context, empty histories, save/load, and that they learn."""

from __future__ import annotations

import pytest
import torch

from towerflow.config import ModelConfig
from towerflow.models.batch import Batch, FeatureSizes, ItemFeatures
from towerflow.models.item_tower import FeatureTableError
from towerflow.models.loss import in_batch_softmax_loss
from towerflow.models.two_tower import TwoTower, load_model, save_model
from towerflow.models.user_tower import UserTowerInputError

N_ITEMS = 30
SIZES = FeatureSizes(
    n_items=N_ITEMS, n_categories=4, n_genres=5, dense_dim=3, demographic_cardinalities=(3, 2)
)
SMALL = {"dim": 8, "d_model": 8, "n_heads": 2, "n_layers": 1, "hidden": 16, "max_seq_len": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def features(n_rows: int = N_ITEMS + 1, seed: int = 0) -> ItemFeatures:
    g = torch.Generator().manual_seed(seed)
    category = torch.randint(1, 5, (n_rows,), generator=g)
    genres = torch.randint(0, 6, (n_rows, 2), generator=g)
    dense = torch.randn(n_rows, 3, generator=g)
    category[0], genres[0], dense[0] = 0, 0, 0.0  # row 0 is padding
    return ItemFeatures(category=category, genres=genres, dense=dense)


def model(seed: int = 0, **overrides) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(SIZES, features(), ModelConfig(**{**SMALL, **overrides}))


def batch(b: int = 6, length: int = 5, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (b, length), generator=g)
    items[0, :3] = 0  # a short history, left-padded
    items[1] = 0  # a new user: nothing but padding
    actions = torch.randint(1, 7, (b, length), generator=g).masked_fill(items == 0, 0)
    return Batch(
        hist_items=items,
        hist_actions=actions,
        hist_gaps=torch.randint(0, 16, (b, length), generator=g),
        context_items=torch.tensor([0, 3, 7, 0, 12, 5])[:b],
        surface=torch.randint(0, 3, (b,), generator=g),
        user_feats=torch.randint(0, 3, (b, 2), generator=g),
        target_items=torch.randint(1, N_ITEMS + 1, (b,), generator=g),
    )


def test_shapes_and_unit_norms_in_train_and_eval():
    m, bt = model(), batch()
    for training in (True, False):
        m.train(training)
        u, v = m(bt)
        assert u.shape == (6, 8) and v.shape == (6, 8)
        assert torch.allclose(u.norm(dim=1), torch.ones(6)) and torch.allclose(v.norm(dim=1), torch.ones(6))
    h = m.encode_history(bt.hist_items, bt.hist_actions, bt.hist_gaps)
    assert h.shape == (6, 3 * 8) == (6, m.history_dim)  # max-pool + 1 latest token + mean of engaged items
    assert m.item_vectors(torch.tensor([1, 2, 3])).shape == (3, 8)


def test_unique_item_reuse_matches_the_plain_path():
    m, bt = model().eval(), batch()
    u, v = m(bt)
    plain_u = m.user_tower(
        bt.hist_items, bt.hist_actions, bt.hist_gaps, bt.context_items, bt.surface, bt.user_feats
    )
    assert torch.allclose(u, plain_u, atol=1e-6)
    assert torch.allclose(v, m.item_tower(bt.target_items), atol=1e-6)
    assert torch.allclose(m.user_vectors(bt), u, atol=1e-6)


def test_deterministic_given_the_seed():
    a, b = model(seed=5), model(seed=5)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(model(seed=6).item_tower.id_emb.weight, a.item_tower.id_emb.weight)


def test_id_less_item_gets_a_finite_vector_that_depends_on_its_features():
    m = model().eval()
    tower = m.item_tower
    cat, genres, dense = (
        torch.tensor([2, 2]),
        torch.tensor([[1, 3], [1, 3]]),
        torch.tensor([[0.5, 0.0, 1.0]] * 2),
    )
    v = tower.embed_features(cat, genres, dense, item_idx=torch.tensor([0, 0]))
    assert torch.isfinite(v).all() and torch.allclose(v.norm(dim=1), torch.ones(2))
    other = tower.embed_features(torch.tensor([3, 2]), torch.tensor([[1, 3], [4, 0]]), dense, item_idx=None)
    assert not torch.allclose(v[0], other[0]) and not torch.allclose(v[1], other[1])
    # the id matters for a known item: item 4 with its id differs from item 4's features alone
    with_id = tower(torch.tensor([4]))
    without = tower.embed_features(tower.category[[4]], tower.genres[[4]], tower.dense[[4]], item_idx=None)
    assert not torch.allclose(with_id, without)


def test_grown_catalog_embeds_new_items_from_features():
    m = model().eval()
    before = m.item_vectors(torch.arange(1, N_ITEMS + 1))
    grown = features(N_ITEMS + 1 + 4)  # 4 items added after training
    old = features()
    grown.category[: N_ITEMS + 1] = old.category
    grown.genres[: N_ITEMS + 1] = old.genres
    grown.dense[: N_ITEMS + 1] = old.dense
    m.set_features(grown)
    assert torch.allclose(m.item_vectors(torch.arange(1, N_ITEMS + 1)), before)  # old items unchanged
    new = torch.arange(N_ITEMS + 1, N_ITEMS + 5)
    t = m.item_tower
    expected = t.embed_features(t.category[new], t.genres[new], t.dense[new], item_idx=None)
    assert torch.allclose(m.item_vectors(new), expected)
    assert torch.isfinite(m.item_vectors(new)).all()
    assert m.all_item_vectors().shape == (N_ITEMS + 5, 8)


def test_id_dropout_drops_ids_in_training_only():
    m = model(id_dropout=0.99, dropout=0.0)
    t = m.item_tower
    idx = torch.arange(1, N_ITEMS + 1)
    features_only = t.embed_features(t.category[idx], t.genres[idx], t.dense[idx], item_idx=None)
    torch.manual_seed(0)
    train_vecs = t.train()(idx)
    dropped = torch.isclose(train_vecs, features_only, atol=1e-6).all(dim=1)
    assert dropped.float().mean() > 0.9
    assert not torch.isclose(t.eval()(idx), features_only, atol=1e-6).all(dim=1).any()


def test_context_changes_u_only_when_used():
    bt = batch()
    moved = Batch(**{**bt.__dict__, "context_items": torch.tensor([9, 9, 9, 9, 9, 9])})
    with_ctx = model().eval()
    assert not torch.allclose(with_ctx.user_vectors(bt), with_ctx.user_vectors(moved))
    no_ctx = model(use_context=False).eval()
    moved_surface = Batch(**{**moved.__dict__, "surface": (bt.surface + 1) % 3})
    assert torch.equal(no_ctx.user_vectors(bt), no_ctx.user_vectors(moved_surface))
    assert not hasattr(no_ctx.user_tower, "no_context")


def test_context_dropout_replaces_the_viewed_item_with_the_no_context_vector():
    m = model(context_dropout=0.99, dropout=0.0, id_dropout=0.0)
    bt = batch()
    none = Batch(**{**bt.__dict__, "context_items": torch.zeros(6, dtype=torch.long)})
    expected = m.eval().user_vectors(none)
    torch.manual_seed(0)
    got = m.train().user_vectors(bt)
    assert torch.isclose(got, expected, atol=1e-6).all(dim=1).float().mean() > 0.8


def test_padding_only_history_is_finite_and_padding_is_ignored():
    m = model().eval()
    bt = batch()
    h = m.encode_history(bt.hist_items, bt.hist_actions, bt.hist_gaps)
    assert torch.isfinite(h).all()
    assert torch.equal(h[1], torch.zeros(m.history_dim))  # the new user: h = 0, as serving assumes
    u = m.user_vectors(bt)
    assert torch.isfinite(u).all()
    # garbage in padded slots changes nothing, and a row does not depend on the other rows of the batch
    noisy_actions = bt.hist_actions.masked_fill(bt.hist_items == 0, 3)
    noisy_gaps = bt.hist_gaps.masked_fill(bt.hist_items == 0, 9)
    h2 = m.encode_history(bt.hist_items, noisy_actions, noisy_gaps)
    assert torch.allclose(h, h2, atol=1e-6)
    alone = m.encode_history(bt.hist_items[:1], bt.hist_actions[:1], bt.hist_gaps[:1])
    assert torch.allclose(alone, h[:1], atol=1e-6)
    # gradients stay finite through an all-padding row
    m.train()
    u, v = m(bt)
    in_batch_softmax_loss(u, v, bt.target_items, None, 0.1).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_history_shorter_than_latest_tokens():
    m = model(latest_tokens=3).eval()
    h = m.encode_history(torch.tensor([[4, 5]]), torch.tensor([[2, 3]]), torch.tensor([[1, 0]]))
    assert h.shape == (1, 5 * 8) and torch.isfinite(h).all()  # max-pool, 3 latest, mean of engaged items
    assert torch.equal(h[0, 8:16], torch.zeros(8))  # the missing oldest "latest" slot is zero


def test_save_load_round_trip(tmp_path):
    m = model()
    m.set_log_q(torch.linspace(-5, -1, N_ITEMS + 1))
    m.eval()
    bt = batch()
    save_model(m, tmp_path / "model")
    state = torch.load(tmp_path / "model" / "weights.pt", weights_only=True)
    assert not any(k.startswith("user_tower.item_tower.") for k in state)  # the shared tower is stored once
    loaded = load_model(tmp_path / "model")
    assert not loaded.training
    assert loaded.cfg == m.cfg and loaded.sizes == m.sizes
    assert torch.equal(loaded.user_vectors(bt), m.user_vectors(bt))
    assert torch.equal(loaded.all_item_vectors(), m.all_item_vectors())
    assert torch.equal(loaded.log_q, m.log_q)


def test_load_leaves_the_global_rng_alone(tmp_path):
    save_model(model(), tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_grown_table_round_trips(tmp_path):
    m = model().eval()
    m.set_features(features(N_ITEMS + 1 + 7, seed=4))
    save_model(m, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.item_tower.n_rows == N_ITEMS + 8
    assert torch.equal(loaded.all_item_vectors(), m.all_item_vectors())


def test_bad_inputs_name_the_problem():
    m = model()
    bt = batch()
    with pytest.raises(UserTowerInputError, match="time-gap"):
        m.encode_history(bt.hist_items, bt.hist_actions, bt.hist_gaps + 16)
    with pytest.raises(UserTowerInputError, match="max_seq_len=8"):
        long = torch.ones(1, 9, dtype=torch.long)
        m.encode_history(long, long, long)
    with pytest.raises(UserTowerInputError, match="user_feats"):
        m.combine(torch.zeros(1, m.history_dim), torch.tensor([0]), torch.tensor([0]), torch.tensor([[0, 5]]))
    with pytest.raises(FeatureTableError, match="outside the feature table"):
        m.item_vectors(torch.tensor([N_ITEMS + 1]))
    bad = features()
    bad.category[3] = 9
    with pytest.raises(FeatureTableError, match="category values must be in"):
        m.set_features(bad)


def test_towers_and_loss_learn_a_toy_mapping():
    """Each user's single history item determines the target (a random permutation): after a few hundred
    Adam steps the loss falls far below log(n) and every user's top-1 item is the right one."""
    n = 20
    torch.manual_seed(0)
    sizes = FeatureSizes(n_items=n, n_categories=3, n_genres=4, dense_dim=0, demographic_cardinalities=())
    feats = ItemFeatures(category=torch.randint(0, 4, (n + 1,)), genres=torch.randint(0, 5, (n + 1, 2)))
    cfg = ModelConfig(
        dim=16, d_model=16, n_heads=2, n_layers=1, hidden=32, dropout=0.0, id_dropout=0.0, max_seq_len=4
    )
    m = TwoTower(sizes, feats, cfg)
    target = torch.randperm(n) + 1
    hist = torch.zeros(n, 4, dtype=torch.long)
    hist[:, -1] = torch.arange(1, n + 1)
    bt = Batch(
        hist_items=hist,
        hist_actions=(hist > 0).long() * 2,
        hist_gaps=torch.zeros_like(hist),
        context_items=torch.zeros(n, dtype=torch.long),
        surface=torch.zeros(n, dtype=torch.long),
        user_feats=torch.zeros(n, 0, dtype=torch.long),
        target_items=target,
    )
    opt = torch.optim.Adam(m.parameters(), lr=3e-3, foreach=True)
    losses = []
    for _ in range(200):
        u, v = m(bt)
        loss = in_batch_softmax_loss(u, v, bt.target_items, None, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0  # at least log(20): random unit vectors at temperature 0.1
    assert sum(losses[-10:]) / 10 < 0.3
    m.eval()
    scores = m.user_vectors(bt) @ m.all_item_vectors().T  # (n, n + 1)
    scores[:, 0] = float("-inf")
    assert torch.equal(scores.argmax(dim=1), target)


def test_history_mean_is_the_mean_of_positively_engaged_items_only():
    m = model().eval()
    items = torch.tensor([[0, 4, 5, 6], [0, 0, 0, 7]])
    actions = torch.tensor([[0, 2, 5, 4], [0, 0, 0, 6]])  # click, skip, conversion | hide
    h = m.encode_history(items, actions, torch.ones_like(items).masked_fill(items == 0, 0))
    vecs = m.item_vectors(torch.tensor([4, 6]))
    assert torch.allclose(h[0, -8:], (vecs[0] + vecs[1]) / 2, atol=1e-6)  # the skipped item 5 is left out
    assert torch.equal(h[1, -8:], torch.zeros(8))  # only a hide: nothing engaged with


def test_residual_paths_can_be_turned_off():
    m = model(history_residual=False, context_residual=False)
    assert m.history_dim == 2 * 8
    assert not hasattr(m.user_tower, "history_gate") and not hasattr(m.user_tower, "context_gate")
    u, _ = m.eval()(batch())
    assert torch.allclose(u.norm(dim=1), torch.ones(6))
