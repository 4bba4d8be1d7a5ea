"""The refit (tasks/refit.py): train + validation rows, the best epoch count, the holdout never trained on."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from towerflow.config import AugmentConfig, ExamplesConfig, ModelConfig, RetrainConfig, TrainConfig
from towerflow.tasks.augment_context import augment_context
from towerflow.tasks.build_examples import Examples, SequenceExamples, build_examples
from towerflow.tasks.refit import augment_examples, augment_refit_rows, refit_examples, refit_wanted
from towerflow.tasks.train import train

START = pd.Timestamp("2026-01-01", tz="UTC")
TINY_MODEL = ModelConfig(dim=8, d_model=8, hidden=16, max_seq_len=8, n_heads=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def three_day_world(n_users: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Each user u clicks items 10u+1 .. 10u+5 in order: two on day 0 (train), two on day 1 (validation), one on
    day 2 (holdout). Item 10u+j is clicked once, by u only, so a row's target says whose row it is."""
    items = pd.DataFrame({"item_id": [10 * u + j for u in range(1, n_users + 1) for j in range(1, 6)],
                          "category": [f"c{u % 3}" for u in range(1, n_users + 1) for _ in range(5)],
                          "genres": None, "title": None, "created_ts": START - pd.Timedelta(days=30)})
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "signup_ts": START - pd.Timedelta(days=30),
                          "country": "xx"})
    rows = [(f"{u}-{j}", u, 10 * u + j, "click", START + pd.Timedelta(days=day, minutes=u, seconds=j), "homefeed",
             None, None)
            for u in range(1, n_users + 1) for j, day in zip(range(1, 6), [0, 0, 1, 1, 2], strict=True)]
    events = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "action", "ts", "surface",
                                         "context_item_id", "query"])
    return events, users, items


def item_ids(ex: Examples, rows: SequenceExamples) -> list[int]:
    return sorted(int(i) for i in ex.vocab.item_ids[rows.target_items - 1])


@pytest.fixture(scope="module")
def time_examples() -> Examples:
    events, users, items = three_day_world()
    return build_examples(events, users, items, START + pd.Timedelta(days=3), ExamplesConfig(max_seq_len=8))


def test_the_refit_trains_on_every_validation_day_positive_and_never_on_the_holdout(time_examples):
    ex = time_examples
    assert ex.meta["split"] == "time"
    assert item_ids(ex, ex.train) == [11, 12, 21, 22, 31, 32]
    assert item_ids(ex, ex.valid) == [13, 23, 33]  # early stopping: each user's first validation-day positive
    assert item_ids(ex, ex.refit_extra) == [13, 14, 23, 24, 33, 34]  # the refit: all of them
    assert item_ids(ex, ex.holdout) == [15, 25, 35]
    refit = refit_examples(ex)
    assert item_ids(refit, refit.train) == [11, 12, 13, 14, 21, 22, 23, 24, 31, 32, 33, 34]
    assert refit.valid is None and refit.refit_extra is None
    assert not set(item_ids(refit, refit.train)) & set(item_ids(ex, ex.holdout))
    # a refit row's history is what was known before its target: the validation-day row 14 saw 11, 12, 13
    row = int(np.flatnonzero(refit.vocab.item_ids[refit.train.target_items - 1] == 14)[0])
    hist = refit.train.hist_items[row]
    assert sorted(int(i) for i in refit.vocab.item_ids[hist[hist > 0] - 1]) == [11, 12, 13]


def test_leave_one_out_refit_rows_are_the_validation_rows():
    events, users, items = three_day_world()
    ex = build_examples(events, users, items, START + pd.Timedelta(days=3),
                        ExamplesConfig(max_seq_len=8, split="leave_one_out"))
    assert item_ids(ex, ex.refit_extra) == item_ids(ex, ex.valid) == [14, 24, 34]
    assert item_ids(ex, ex.holdout) == [15, 25, 35]


def test_refit_rows_survive_save_and_load(time_examples, tmp_path):
    loaded = Examples.load(time_examples.save(tmp_path / "ex"))
    assert item_ids(loaded, loaded.refit_extra) == [13, 14, 23, 24, 33, 34]
    assert loaded.meta["n_refit_extra"] == 6


def test_auto_refits_a_time_split_and_not_leave_one_out(time_examples):
    loo = {**time_examples.meta, "split": "leave_one_out"}
    as_loo = Examples(**{**time_examples.__dict__, "meta": loo})
    assert refit_wanted(TrainConfig(), time_examples)[0] is True
    assert refit_wanted(TrainConfig(), as_loo) == (False, "refit auto -> off (leave_one_out split)")
    assert refit_wanted(TrainConfig(refit=True), as_loo)[0] is True
    assert refit_wanted(TrainConfig(refit=False), time_examples) == (False, "refit off")
    no_valid = Examples(**{**time_examples.__dict__, "valid": None, "valid_seen": None})
    assert refit_wanted(TrainConfig(refit=True), no_valid) == (False, "no refit (no validation split)")
    # the augment stage drops a leave-one-out split's refit rows under auto: the reason is still the split
    dropped = Examples(**{**as_loo.__dict__, "refit_extra": None})
    assert refit_wanted(TrainConfig(), dropped) == (False, "refit auto -> off (leave_one_out split)")
    with pytest.raises(ValueError, match="refit"):
        TrainConfig(refit="sometimes")
    # a refit asked for without a validation split would be recorded in the release and never run: refused
    with pytest.raises(ValueError, match="train.refit true needs examples.validation true"):
        RetrainConfig(examples=ExamplesConfig(validation=False), train=TrainConfig(refit=True))
    assert RetrainConfig(examples=ExamplesConfig(validation=False)).train.refit == "auto"


def test_concat_pads_the_narrower_query():
    a = SequenceExamples.empty(2).concat(SequenceExamples.empty(2))
    assert len(a) == 0
    one = SequenceExamples(*(np.array([v]) for v in (1,)), np.ones((1, 2), np.int64), np.ones((1, 2), np.int64),
                           np.ones((1, 2), np.int64), *(np.array([v]) for v in (0, 0, 7, 100)),
                           query=np.array([[5, 6, 9]]))
    two = one.concat(SequenceExamples(*(np.array([v]) for v in (2,)), np.zeros((1, 2), np.int64),
                                      np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64),
                                      *(np.array([v]) for v in (0, 0, 8, 200))))
    assert two.user_idx.tolist() == [1, 2] and two.target_items.tolist() == [7, 8]
    assert two.query.tolist() == [[5, 6, 9], [0, 0, 0]]


def test_refit_rows_are_augmented_among_train_and_themselves(time_examples):
    ex = time_examples
    config = AugmentConfig(pseudo_context_prob=1.0, pseudo_query_prob=0.0)
    extra = augment_refit_rows(ex.train, ex.refit_extra, ex.item_feats, config, ex.item_text)
    whole, _ = augment_context(ex.train.concat(ex.refit_extra), ex.item_feats, config, ex.item_text)
    assert len(extra) == 6
    assert extra.context_items.tolist() == whole.context_items[6:].tolist()
    assert (extra.context_items > 0).all() and (extra.target_items == ex.refit_extra.target_items).all()
    # the retrain's one call: train augmented on its own (as without a refit), the refit rows as above
    both, stats = augment_examples(ex, config)
    alone, _ = augment_context(ex.train, ex.item_feats, config, ex.item_text)
    assert stats.n_rows == 6 and both.train.context_items.tolist() == alone.context_items.tolist()
    assert both.refit_extra.context_items.tolist() == extra.context_items.tolist()
    assert (ex.train.context_items == 0).all()  # the built examples are left as they were
    without, _ = augment_examples(ex, config, refit=False)  # no refit will train on them: dropped, not augmented
    assert without.refit_extra is None and without.train.context_items.tolist() == alone.context_items.tolist()


def test_train_keeps_the_refit_for_the_best_epoch_count_with_logq_over_train_and_validation(time_examples):
    config = TrainConfig(model=TINY_MODEL, epochs=3, batch_size=4, patience=5, seed=0)
    result = train(time_examples, config)
    assert result.best_epoch >= 1 and result.refit_epochs == result.best_epoch
    assert [e.epoch for e in result.refit_history] == list(range(1, result.best_epoch + 1))
    # logQ counts the refit's 12 targets, each clicked once: log(1/12) for every one of them
    targets = torch.from_numpy(refit_examples(time_examples).train.target_items)
    assert torch.allclose(result.model.log_q[targets], torch.full((12,), math.log(1 / 12)))
    first = train(time_examples, config.model_copy(update={"refit": False}))
    assert first.refit_epochs == 0 and first.refit_history == []
    assert torch.allclose(first.model.log_q[targets[:6]], torch.full((6,), math.log(1 / 6)))
    again = train(time_examples, config)  # same seed: the same refit
    for a, b in zip(result.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
