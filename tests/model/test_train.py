"""The training loop: it learns a planted world, resumes exactly from a checkpoint, and refuses a diverged loss."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from towerflow.config import AugmentConfig, ExamplesConfig, ModelConfig, TrainConfig
from towerflow.models.batch import ItemFeatures
from towerflow.models.query import texts_differ
from towerflow.tasks.augment_context import augment_context
from towerflow.tasks.build_examples import Examples, build_examples
from towerflow.tasks.evaluate import PopularityBaseline, metrics_from_ranks, target_ranks
from towerflow.tasks.scoring import model_metrics
from towerflow.tasks.train import TrainError, TrainResult, fit_model_config, train

START = pd.Timestamp("2026-01-01", tz="UTC")
N_TOPICS, ITEMS_PER_TOPIC, N_USERS = 6, 20, 300
TINY_MODEL = ModelConfig(dim=16, d_model=16, hidden=32, max_seq_len=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_world(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """6 topics x 20 items, equally popular; each of 300 users clicks only items of one topic (user % 6), a
    fresh one each time: 6 clicks on day 0, 3 on day 1 (validation), 3 on day 2 (holdout).

    Popularity can only guess: its top 10 of the ~110 unseen items holds the target about 10/110 of the time.
    A model that learns "the topic of the history" ranks the ~9 unseen items of that topic first: recall@10 ~ 1.
    """
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({
        "item_id": np.arange(1, N_TOPICS * ITEMS_PER_TOPIC + 1),
        "category": [f"topic{(i - 1) // ITEMS_PER_TOPIC}" for i in range(1, N_TOPICS * ITEMS_PER_TOPIC + 1)],
        "genres": None, "title": None, "created_ts": START - pd.Timedelta(days=30),
    })
    users = pd.DataFrame({"user_id": np.arange(1, N_USERS + 1), "signup_ts": START - pd.Timedelta(days=30),
                          "country": "xx"})
    rows = []
    for u in range(1, N_USERS + 1):
        topic_items = (u % N_TOPICS) * ITEMS_PER_TOPIC + 1 + rng.permutation(ITEMS_PER_TOPIC)
        for j, (day, item) in enumerate(zip([0] * 6 + [1] * 3 + [2] * 3, topic_items, strict=False)):
            ts = START + pd.Timedelta(days=day, minutes=u, seconds=10 * j)
            rows.append((f"{u}-{j}", u, int(item), "click", ts, "homefeed", None, None))
    events = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "action", "ts", "surface",
                                         "context_item_id", "query"])
    return events, users, items


@pytest.fixture(scope="module")
def examples() -> Examples:
    events, users, items = planted_world()
    return build_examples(events, users, items, START + pd.Timedelta(days=3),
                          ExamplesConfig(max_seq_len=8, validation=True))


def config(**overrides) -> TrainConfig:
    base = dict(model=TINY_MODEL, epochs=4, batch_size=64, patience=10, seed=0)
    return TrainConfig(**{**base, **overrides})


def test_training_beats_popularity_on_the_holdout(examples):
    result = train(examples, config())
    model = model_metrics(result.model, examples.holdout, examples.user_feats, examples.holdout_seen, ks=(10,))
    pop = PopularityBaseline.fit(examples.train, examples.vocab.n_items)
    popularity = metrics_from_ranks(
        target_ranks(pop.score_rows, examples.holdout.target_items, examples.vocab.n_items, examples.holdout_seen),
        ks=(10,),
    )
    assert model["n"] == popularity["n"] == N_USERS
    assert popularity["recall@10"] < 0.2
    assert model["recall@10"] > 0.6
    assert [e.epoch for e in result.history] == [1, 2, 3, 4]
    assert result.early_stopping_split == "valid"
    # the loss goes down and the kept weights are those of the best validation epoch
    assert result.history[-1].loss < result.history[0].loss
    best = max(result.history, key=lambda e: e.metrics["recall@10"])
    assert result.best_epoch == best.epoch


@pytest.mark.parametrize("average_epochs", [0, 1.5])  # 1.5: the weight average goes through the checkpoint too
def test_resume_from_checkpoint_gives_the_same_weights(examples, tmp_path, average_epochs):
    class Crash(Exception):
        pass

    def crash_after_two(stats):
        if stats.epoch == 2:
            raise Crash

    cfg = config(average_epochs=average_epochs)
    with pytest.raises(Crash):
        train(examples, cfg, checkpoint_dir=tmp_path, on_epoch=crash_after_two)
    seen: list[int] = []
    resumed = train(examples, cfg, checkpoint_dir=tmp_path, on_epoch=lambda s: seen.append(s.epoch))
    straight = train(examples, cfg)

    # the epochs done before the crash are replayed to on_epoch, then training continues at epoch 3
    assert seen == [1, 2, 3, 4]
    assert [e.epoch for e in resumed.history] == [1, 2, 3, 4]
    assert resumed.best_epoch == straight.best_epoch
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [e.loss for e in resumed.history] == pytest.approx([e.loss for e in straight.history], rel=0, abs=0)
    # the epochs after the restart are judged alike (with the average, the one restored from the checkpoint)
    assert [e.metrics for e in resumed.history] == [e.metrics for e in straight.history]


def test_a_finished_checkpoint_is_not_trained_again(examples, tmp_path):
    first = train(examples, config(epochs=2), checkpoint_dir=tmp_path)
    again = train(examples, config(epochs=2), checkpoint_dir=tmp_path)
    assert [e.epoch for e in again.history] == [1, 2]
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_nan_loss_raises_train_error(examples):
    # a temperature this small turns every logit into +-inf, and the softmax of inf - inf is NaN
    with pytest.raises(TrainError, match="loss became nan"):
        train(examples, config(temperature=1e-45))


def test_too_few_examples_is_an_error(examples):
    tiny = Examples(**{**examples.__dict__, "train": examples.train.take(np.arange(1))})
    with pytest.raises(TrainError, match="at least 2 training examples"):
        train(tiny, config())


def test_num_threads_is_applied_and_restored(examples):
    small = Examples(**{**examples.__dict__, "train": examples.train.take(np.arange(128))})
    torch.set_num_threads(1)
    seen = []
    train(small, config(epochs=1, num_threads=2), on_epoch=lambda s: seen.append(torch.get_num_threads()))
    assert seen == [2]
    assert torch.get_num_threads() == 1


def test_result_round_trips_through_save_and_load(examples, tmp_path):
    result = train(examples, config(epochs=1))
    loaded = TrainResult.load(result.save(tmp_path))
    assert loaded.best_epoch == result.best_epoch == 1
    assert [e.loss for e in loaded.history] == [e.loss for e in result.history]
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k


def test_histories_that_do_not_fit_the_model_are_refused_by_name(examples):
    from pydantic import ValidationError

    from towerflow.config import RetrainConfig

    # the examples' histories are 8 long with 16 gap buckets: a 4-slot position table or 8 buckets cannot take them
    with pytest.raises(TrainError, match=r"max_seq_len \(8\) exceeds train.model.max_seq_len \(4\)"):
        train(examples, config(model=TINY_MODEL.model_copy(update={"max_seq_len": 4})))
    with pytest.raises(TrainError, match=r"gap_buckets \(16\) must equal train.model.gap_buckets \(8\)"):
        train(examples, config(model=TINY_MODEL.model_copy(update={"gap_buckets": 8})))
    # the same check when a config is loaded, before anything runs
    with pytest.raises(ValidationError, match=r"examples.gap_buckets \(12\) must equal"):
        RetrainConfig.model_validate({"examples": {"gap_buckets": 12}})
    with pytest.raises(ValidationError, match=r"examples.max_seq_len \(80\) exceeds"):
        RetrainConfig.model_validate({"examples": {"max_seq_len": 80}})


def test_by_default_early_stopping_watches_a_validation_split_never_the_holdout():
    events, users, items = planted_world()
    ex = build_examples(events, users, items, START + pd.Timedelta(days=3), ExamplesConfig(max_seq_len=8))
    # every user is active on the last day: the auto split is the time split, day 1 validates, day 2 is held out
    assert ex.meta["split"] == "time" and len(ex.valid) == len(ex.holdout) == N_USERS
    assert (ex.valid.ts < ex.holdout.ts.min()).all() and (ex.train.ts < ex.valid.ts.min()).all()
    assert (TrainConfig().epochs, TrainConfig().patience) == (40, 5)
    result = train(ex, config(epochs=2))
    assert result.early_stopping_split == "valid"


def test_a_catalog_without_features_trains_without_id_dropout(examples):
    # The planted world has categories: id_dropout is kept. The same catalog with every feature blanked leaves a
    # dropped id nothing to stand on, so the model is built with id_dropout 0 (and says why).
    kept, why = fit_model_config(examples, TINY_MODEL.model_copy(update={"id_dropout": 0.3}))
    assert (kept.id_dropout, why) == (0.3, None)
    feats = examples.item_feats
    blank = copy.copy(examples)
    # one category for every item (the importer's "unknown"), no genres: nothing tells two items apart
    blank.item_feats = ItemFeatures(category=torch.ones_like(feats.category), genres=torch.zeros_like(feats.genres),
                                    dense=None)
    fitted, why = fit_model_config(blank, TINY_MODEL.model_copy(update={"id_dropout": 0.3}))
    assert fitted.id_dropout == 0.0 and "no item features" in why
    one_genre = copy.copy(blank)
    genres = torch.zeros_like(feats.genres)
    genres[1:, 0] = torch.arange(len(genres) - 1) % 2 + 1  # two genres alternate
    one_genre.item_feats = ItemFeatures(category=blank.item_feats.category, genres=genres, dense=None)
    assert fit_model_config(one_genre, TINY_MODEL)[1] is None  # genres differ: features to learn from
    assert train(blank, config(epochs=1, model=TINY_MODEL.model_copy(update={"id_dropout": 0.3}))
                 ).model.cfg.id_dropout == 0.0



def test_item_texts_that_tell_no_two_items_apart_train_without_the_query_path(examples):
    # A plain user,item,timestamp import titles nothing and gives every item the category "unknown": one text for
    # all. A query could match nothing, so the model is built without the query path and no pseudo-query is made.
    assert texts_differ(["", "Red shoes", "red  SHOES!"]) is False  # one text once normalised
    assert texts_differ(["", "red shoes", "blue shoes"]) is True
    query_model = TINY_MODEL.model_copy(update={"use_query": True})
    with_text = copy.copy(examples)
    with_text.item_text = [""] + [f"item {i}" for i in range(1, len(examples.item_feats.category))]
    assert fit_model_config(with_text, query_model)[1] is None
    blank = copy.copy(examples)
    blank.item_text = [""] + ["unknown"] * (len(examples.item_feats.category) - 1)
    fitted, why = fit_model_config(blank, query_model)
    assert fitted.use_query is False and "use_query -> False" in why
    _, stats = augment_context(blank.train, blank.item_feats, AugmentConfig(pseudo_query_prob=1.0), blank.item_text)
    assert stats.n_pseudo_query == 0
    _, stats = augment_context(with_text.train, with_text.item_feats, AugmentConfig(pseudo_query_prob=1.0),
                               with_text.item_text)
    assert stats.n_pseudo_query > 0
