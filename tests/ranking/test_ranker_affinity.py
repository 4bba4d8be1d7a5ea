"""The ranker's affinity features (models/ranker.py affinity_features): the candidate's cosine with the mean and the
max of the sequence's positive and negative actions' item vectors, by hand on a 3-item table; in the DCN input only
when configured; a ranker saved before the flag loads without them. The recency features (recency_features) alike.
"""

from __future__ import annotations

import json
import math

import torch

from towerflow.config import RankerConfig
from towerflow.models.ranker import (
    N_AFFINITY,
    Ranker,
    RankerBatch,
    affinity_features,
    load_ranker,
    save_ranker,
)
from towerflow.tasks.history import ACTION_INDEX

# row 0 padding; item 1 = x, item 2 = y, item 3 = (3, 4) (norm 5)
TABLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
CLICK, SAVE, SKIP, HIDE, IMP = (ACTION_INDEX[a] for a in ("click", "save", "skip", "hide", "impression"))
SMALL = RankerConfig(max_seq_len=5, latest_k=2, action_dim=2, item_dim=3, mlp_hidden=(8,), dropout=0.0,
                     recency_feature=False)


def test_affinity_by_hand_on_a_three_item_table():
    # sequence: padding, click item 1, save item 3, hide item 2, impression item 2 (ignored)
    items = torch.tensor([[0, 1, 3, 2, 2]])
    actions = torch.tensor([[0, CLICK, SAVE, HIDE, IMP]])
    got = affinity_features(TABLE, torch.tensor([1, 2, 3]), items, actions)
    # positives: items 1 and 3, mean (2, 2) -> direction (1, 1)/sqrt2; negatives: item 2 alone
    r = 1 / math.sqrt(2)
    expected = torch.tensor([
        # pos mean cos, pos max cos, neg mean cos, neg max cos
        [r, 1.0, 0.0, 0.0],  # candidate 1 = x: cos with (1,1) r; max over {x, (.6,.8)} 1; vs y 0
        [r, 0.8, 1.0, 1.0],  # candidate 2 = y: max over {0, .8}; it is the hidden item itself
        [0.7 * math.sqrt(2), 1.0, 0.8, 0.8],  # candidate 3 = (.6,.8): (.6 + .8) r; itself saved; vs y .8
    ])
    torch.testing.assert_close(got, expected)
    # the same sequence given per row (the training batch) gives the same numbers
    torch.testing.assert_close(affinity_features(TABLE, torch.tensor([1, 2, 3]), items.repeat(3, 1),
                                                 actions.repeat(3, 1)), expected)


def test_no_positive_or_negative_action_gives_zeros():
    got = affinity_features(TABLE, torch.tensor([1, 3]), torch.tensor([[0, 0, 2, 3, 1]]),
                            torch.tensor([[0, 0, IMP, IMP, SKIP]]))
    # no positives: zeros; one skip on item 1: candidate 1 cos 1, candidate 3 cos .6
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.6, 0.6]]))
    empty = affinity_features(TABLE, torch.tensor([2]), torch.zeros((1, 5), dtype=torch.int64),
                              torch.zeros((1, 5), dtype=torch.int64))
    assert empty.tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_the_dcn_sees_the_affinity_only_when_configured():
    on, off = Ranker(TABLE, SMALL), Ranker(TABLE, SMALL.model_copy(update={"affinity_features": False}))
    no_seq = Ranker(TABLE, SMALL.model_copy(update={"use_sequence": False}))
    seq_dim = on.sequence.out_dim  # (1 + K) x (action_dim + 2 x item_dim) = 3 x 8
    assert seq_dim == 24
    assert on.dcn.cross[0].w.in_features == 3 + 4 + seq_dim + N_AFFINITY
    assert off.dcn.cross[0].w.in_features == 3 + 4 + seq_dim
    assert no_seq.dcn.cross[0].w.in_features == 3 + 4  # affinity is of the sequence: none without it
    # the DCN's input ends with the hand-computed numbers (positives items 1 and 3, candidate 2)
    torch.manual_seed(0)
    model = Ranker(TABLE, SMALL).eval()
    batch = RankerBatch(torch.tensor([2]), torch.tensor([0]), torch.tensor([[0, 0, 0, 1, 3]]),
                        torch.tensor([[0, 0, 0, CLICK, SAVE]]), torch.zeros((1, 5)))
    seen = []
    model.dcn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(batch)
    torch.testing.assert_close(seen[0][0, -N_AFFINITY:], torch.tensor([1 / math.sqrt(2), 0.8, 0.0, 0.0]))


def test_a_ranker_saved_before_the_flag_loads_without_affinity(tmp_path):
    torch.manual_seed(0)
    old = Ranker(TABLE, SMALL.model_copy(update={"affinity_features": False})).eval()
    save_ranker(old, tmp_path / "r", release_id="rel-1")
    meta = json.loads((tmp_path / "r" / "ranker.json").read_text())
    del meta["ranker_config"]["affinity_features"]  # as written before the field existed
    (tmp_path / "r" / "ranker.json").write_text(json.dumps(meta))
    back = load_ranker(tmp_path / "r", TABLE, release_id="rel-1")
    assert back.cfg.affinity_features is False and not back.affinity
    batch = RankerBatch(torch.tensor([1, 3]), torch.tensor([0, 1]), torch.tensor([[0, 0, 1, 2, 3]]),
                        torch.tensor([[0, 0, CLICK, HIDE, SAVE]]), torch.zeros((1, 5)))
    torch.testing.assert_close(back(batch), old(batch))
    # a new ranker with the flag round-trips it
    new = Ranker(TABLE, SMALL).eval()
    save_ranker(new, tmp_path / "n", release_id="rel-1")
    assert load_ranker(tmp_path / "n", TABLE).affinity



def test_recency_features_by_hand_and_in_the_dcn_only_with_the_sequence(tmp_path):
    from towerflow.models.ranker import N_RECENCY, recency_features

    actions = torch.tensor([[0, 0, CLICK, HIDE], [0, 0, 0, 0], [CLICK, 0, 0, 0]])
    age = torch.tensor([[0.0, 0.0, 99.0, 9.0], [0.0, 0.0, 0.0, 0.0], [math.e ** 20 - 1, 0.0, 0.0, 0.0]])
    # the latest action: 9 s ago -> log(10) / 10; none -> (0, 0); a padding slot's age 0 never counts
    torch.testing.assert_close(recency_features(actions, age),
                               torch.tensor([[math.log(10.0) / 10, 1.0], [0.0, 0.0], [2.0, 1.0]]))
    on, off = (Ranker(TABLE, SMALL.model_copy(update={"recency_feature": r})) for r in (True, False))
    assert on.dcn.cross[0].w.in_features == off.dcn.cross[0].w.in_features + N_RECENCY
    no_seq = SMALL.model_copy(update={"use_sequence": False})
    assert not Ranker(TABLE, no_seq).recency
    # the DCN's input ends with them: the latest action (a save) 30 s before the request
    torch.manual_seed(0)
    model = on.eval()
    batch = RankerBatch(torch.tensor([2]), torch.tensor([0]), torch.tensor([[0, 0, 0, 1, 3]]),
                        torch.tensor([[0, 0, 0, CLICK, SAVE]]), torch.tensor([[0.0, 0.0, 0.0, 90.0, 30.0]]))
    seen = []
    model.dcn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(batch)
    torch.testing.assert_close(seen[0][0, -N_RECENCY:], torch.tensor([math.log(31.0) / 10, 1.0]))
    # a ranker saved before the flag existed loads without it
    save_ranker(off.eval(), tmp_path / "r", release_id="rel-1")
    meta = json.loads((tmp_path / "r" / "ranker.json").read_text())
    del meta["ranker_config"]["recency_feature"]
    (tmp_path / "r" / "ranker.json").write_text(json.dumps(meta))
    assert not load_ranker(tmp_path / "r", TABLE, release_id="rel-1").recency
