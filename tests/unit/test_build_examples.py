"""Point-in-time examples: vocab and features, history contents, leakage, split boundaries, persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from towerflow.config import ExamplesConfig
from towerflow.contract import ContractError
from towerflow.tasks.build_examples import (
    ACTION_INDEX,
    Examples,
    ExamplesError,
    SeenItems,
    SequenceExamples,
    Vocab,
    build_examples,
    build_vocab,
    feature_sizes,
    gap_bucket,
    item_features,
    user_features,
)

T0 = pd.Timestamp("2026-01-01", tz="UTC")
DAY = 86_400
TIME = {"split": "time", "validation": False}  # the split these hand-built cases are worked for


def _events(rows) -> pd.DataFrame:
    """rows: (user, item, action, seconds after T0[, surface[, context]])."""
    out = []
    for i, r in enumerate(rows):
        user, item, action, sec = r[:4]
        surface = r[4] if len(r) > 4 else "homefeed"
        ctx = r[5] if len(r) > 5 else None
        out.append((f"e{i}", user, item, action, T0 + pd.Timedelta(seconds=sec), surface, ctx, None))
    df = pd.DataFrame(
        out, columns=["event_id", "user_id", "item_id", "action", "ts", "surface", "context_item_id", "query"]
    )
    df["context_item_id"] = df["context_item_id"].astype("Int64")
    return df


def _users(ids, **cols) -> pd.DataFrame:
    return pd.DataFrame({"user_id": ids, "signup_ts": T0, **cols})


def _items(ids, category=None, genres=None, features=None) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "item_id": ids,
            "category": category if category is not None else ["c"] * len(ids),
            "genres": genres if genres is not None else [None] * len(ids),
            "title": "t",
            "created_ts": T0,
        }
    )
    if features is not None:
        df["features"] = features
    return df


def _id(vocab: Vocab, item_id: int) -> int:
    return int(vocab.item_index([item_id])[0])


# --------------------------------------------------------------------------------------------- vocab, features


def test_vocab_maps_ids_and_unknowns_to_zero_and_round_trips_json():
    vocab = build_vocab(_users([30, 10, 20]), _items([7, 5, 9]))
    assert vocab.item_ids.tolist() == [5, 7, 9]
    assert vocab.item_index(pd.array([9, 5, 6, None], dtype="Int64")).tolist() == [3, 1, 0, 0]
    assert vocab.user_index([10, 30, 99]).tolist() == [1, 3, 0]
    again = Vocab.from_json(vocab.to_json())
    assert again.item_ids.tolist() == [5, 7, 9] and again.user_ids.tolist() == [10, 20, 30]


def test_item_and_user_features_follow_the_index_conventions():
    items = _items(
        [5, 7, 9],
        category=["b", "a", "b"],
        genres=["x|y|z", None, "z"],
        features=[[1.0, 0.0], None, [0.0, 2.0]],
    )
    users = _users([10, 20], country=["fr", None], age=["18-24", "25-34"])
    vocab = build_vocab(users, items)
    feats = item_features(items, vocab, max_genres=2)
    assert vocab.categories == ["a", "b"] and vocab.genres == ["x", "y", "z"]
    assert feats.category.tolist() == [0, 2, 1, 2]  # row 0 padding; item 5 -> "b" -> 2
    assert feats.genres.tolist() == [[0, 0], [1, 2], [0, 0], [3, 0]]  # third genre of item 5 cut by max_genres
    assert feats.dense.tolist() == [[0, 0], [1, 0], [0, 0], [0, 2]]  # item 7 has no vector -> zeros
    uf = user_features(users, vocab)
    assert vocab.demographic_fields == ["country", "age"]
    assert uf.tolist() == [[0, 0], [1, 1], [0, 2]]  # row 0 unknown user; null country -> 0
    sizes = feature_sizes(vocab, feats)
    assert (sizes.n_items, sizes.n_categories, sizes.n_genres, sizes.dense_dim) == (3, 2, 3, 2)
    assert sizes.demographic_cardinalities == (1, 2)


def test_item_features_without_dense_column_is_none_and_ragged_vectors_fail():
    vocab = build_vocab(_users([1]), _items([1, 2]))
    assert item_features(_items([1, 2]), vocab).dense is None
    with pytest.raises(ContractError, match="same length"):
        item_features(_items([1, 2], features=[[1.0], [1.0, 2.0]]), vocab)


def test_gap_buckets_are_two_octaves_of_seconds_with_a_cap():
    # 1 + floor(log2(1 + s) / 2): 0 s and 2 s -> 1; 3 s (log2 4 = 2) -> 2; 15 s (log2 16 = 4) -> 3; 1 day -> 9
    assert gap_bucket(np.array([0, 2, 3, 14, 15, DAY]), 16).tolist() == [1, 1, 2, 2, 3, 9]
    assert gap_bucket(np.array([10**12]), 16).tolist() == [15]  # capped at n_buckets - 1
    assert gap_bucket(np.array([DAY]), 4).tolist() == [3]


# --------------------------------------------------------------------------------------------- histories


def test_history_is_last_L_actions_strictly_before_the_target_without_impressions():
    ev = _events(
        [
            (1, 101, "click", 0),
            (1, 102, "skip", 10),
            (1, 103, "impression", 15),  # impressions never enter a history
            (1, 104, "hide", 17),
            (1, 105, "save", 20, "related", 101),  # target with real context
            (1, 106, "conversion", 20),  # same second as the target above: not "before" it
            (1, 107, "click", DAY + 100),
        ]
    )
    items = _items(list(range(101, 108)))
    ex = build_examples(ev, _users([1]), items, T0 + pd.Timedelta(days=2), ExamplesConfig(**TIME, max_seq_len=3))
    v = ex.vocab
    tr = ex.train
    assert [int(x) for x in tr.target_items] == [_id(v, i) for i in (101, 105, 106)]  # positives only, time order
    row_105, row_106 = 1, 2
    assert tr.hist_items[row_105].tolist() == [_id(v, 101), _id(v, 102), _id(v, 104)]
    assert tr.hist_actions[row_105].tolist() == [ACTION_INDEX[a] for a in ("click", "skip", "hide")]
    assert tr.hist_items[row_106].tolist() == tr.hist_items[row_105].tolist()  # 105 (same ts) excluded
    # gaps to the latest history action (t=17), 1 + floor(log2(1 + s) / 2): 17 s -> 3; 7 s -> 2; 0 s -> 1
    assert tr.hist_gaps[row_105].tolist() == [3, 2, 1]
    assert tr.hist_items[0].tolist() == [0, 0, 0] and tr.hist_gaps[0].tolist() == [0, 0, 0]  # nothing before
    assert tr.context_items.tolist() == [0, _id(v, 101), 0]
    assert tr.surface.tolist() == [0, 1, 0]
    assert tr.ts.tolist() == [T0.timestamp(), T0.timestamp() + 20, T0.timestamp() + 20]
    # holdout: the last day holds 107; its history keeps the 3 latest actions before it (L = 3), left to right
    assert ex.holdout.target_items.tolist() == [_id(v, 107)]
    assert ex.holdout.hist_items[0].tolist() == [_id(v, 104), _id(v, 105), _id(v, 106)]


def _reference_history(ev: pd.DataFrame, user: int, ts, L: int) -> list[int]:
    """Slow, obvious version: the user's last L non-impression items with ts strictly before ``ts``."""
    mine = ev[(ev.user_id == user) & (ev.ts < ts) & (ev.action != "impression")]
    items = mine.sort_values("ts", kind="stable").item_id.tolist()[-L:]
    return [0] * (L - len(items)) + items


def test_no_leakage_histories_match_a_slow_reference_on_random_events():
    rng = np.random.default_rng(7)
    n = 600
    actions = ["impression", "click", "save", "conversion", "skip", "hide"]
    # every event gets its own item, so an item in a history names exactly one event and its timestamp;
    # timestamps collide often (30 distinct seconds a day) so ties are exercised
    ev = _events(
        [(int(rng.integers(1, 6)), 1000 + i, str(rng.choice(actions)), int(rng.integers(0, 3 * DAY // 2880)) * 2880)
         for i in range(n)]
    )
    as_of = T0 + pd.Timedelta(days=3)
    ex = build_examples(ev, _users(range(1, 6)), _items(list(range(1000, 1000 + n))), as_of, ExamplesConfig(**TIME, max_seq_len=6))
    ts_of = np.zeros(n + 1, dtype=np.int64)
    ts_of[ex.vocab.item_index(ev.item_id)] = (ev.ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    for split in (ex.train, ex.holdout):
        assert len(split) >= 5
        real = split.hist_items > 0
        assert (ts_of[split.hist_items][real] < np.repeat(split.ts, real.sum(axis=1))).all()
        for r in range(len(split)):
            user = int(ex.vocab.user_ids[split.user_idx[r] - 1])
            ts = pd.Timestamp(int(split.ts[r]), unit="s", tz="UTC")
            want = [_id(ex.vocab, i) if i else 0 for i in _reference_history(ev, user, ts, 6)]
            assert split.hist_items[r].tolist() == want


def test_histories_drop_actions_older_than_max_history_days_before_the_target():
    ev = _events([(1, 1, "click", 0), (1, 2, "click", DAY), (1, 3, "save", 2 * DAY + 1), (1, 4, "click", 3 * DAY)])
    cfg = ExamplesConfig(split="leave_one_out", validation=False, max_seq_len=3, max_history_days=2)
    ex = build_examples(ev, _users([1]), _items([1, 2, 3, 4]), T0 + pd.Timedelta(days=4), cfg)
    v = ex.vocab
    # target 3 (day 2 + 1 s): item 1 (day 0) is 2 days + 1 s old, out; item 2 in. Holdout target 4 (day 3): the
    # cutoff is day 1 exactly, item 2 (day 1) is in (at most 2 days old)
    assert ex.train.hist_items.tolist() == [[0, 0, 0], [0, 0, _id(v, 1)], [0, 0, _id(v, 2)]]
    assert ex.holdout.hist_items.tolist() == [[0, _id(v, 2), _id(v, 3)]]
    assert ex.holdout_seen.row(0).tolist() == sorted([_id(v, 2), _id(v, 3)])  # exclusion over the same history
    assert ex.meta["max_history_days"] == 2


def test_auto_split_is_time_when_the_last_day_holds_enough_users_else_leave_one_out():
    # 4 users active on days 0 and 1 (2 positives each); as_of = day 2, holdout day = day 1
    rows = [(u, 10 * u + d, "click", d * DAY + u) for u in range(1, 5) for d in (0, 1)]
    busy = build_examples(_events(rows), _users(range(1, 5)), _items(sorted({r[1] for r in rows})),
                          T0 + pd.Timedelta(days=2), ExamplesConfig(validation=False))
    assert busy.meta["split"] == "time" and "4 of 4 users" in busy.meta["split_reason"]
    # only user 1 comes back on day 1: 1 of 4 users, under half of them (auto_min_share=0.5 -> needs 2)
    sparse = [r for r in rows if r[3] < DAY or r[0] == 1]
    one = build_examples(_events(sparse), _users(range(1, 5)), _items(sorted({r[1] for r in sparse})),
                         T0 + pd.Timedelta(days=2), ExamplesConfig(validation=False, auto_min_share=0.5))
    assert one.meta["split"] == "leave_one_out" and "1 of 4 users" in one.meta["split_reason"]
    assert "needs 2" in one.meta["split_reason"]


# --------------------------------------------------------------------------------------------- splits


def test_time_split_boundaries_and_first_holdout_positive_per_user():
    boundary = 2 * DAY  # as_of = day 3, holdout_days = 1
    ev = _events(
        [
            (1, 1, "click", boundary - 1),  # last second of train
            (1, 2, "click", boundary),  # first second of the holdout: user 1's holdout
            (1, 3, "save", boundary + 10),  # later holdout positive of user 1: not scored
            (2, 4, "skip", boundary + 5),  # negative: never a target
            (2, 5, "conversion", boundary + 50),
            (2, 6, "click", 3 * DAY),  # at as_of: outside the window
        ]
    )
    ex = build_examples(ev, _users([1, 2]), _items([1, 2, 3, 4, 5, 6]), T0 + pd.Timedelta(days=3), ExamplesConfig(**TIME))
    v = ex.vocab
    assert ex.train.target_items.tolist() == [_id(v, 1)]
    assert ex.holdout.target_items.tolist() == [_id(v, 2), _id(v, 5)]
    assert ex.holdout.user_idx.tolist() == [1, 2]
    # user 2's holdout history includes the holdout-window skip before it; user 1's includes the train click
    assert ex.holdout.hist_items[:, -1].tolist() == [_id(v, 1), _id(v, 4)]
    assert ex.meta["n_events"] == 5


def test_holdout_is_capped_to_max_users_with_a_seeded_sample():
    ev = _events([(u, u, "click", 0) for u in range(1, 9)] + [(u, 10 + u, "click", 2 * DAY + u) for u in range(1, 9)])
    items = _items(list(range(1, 9)) + list(range(11, 19)))
    cfg = ExamplesConfig(**TIME, max_holdout_users=3, seed=1)
    a = build_examples(ev, _users(range(1, 9)), items, T0 + pd.Timedelta(days=3), cfg)
    b = build_examples(ev, _users(range(1, 9)), items, T0 + pd.Timedelta(days=3), cfg)
    assert len(a.holdout) == 3 and len(set(a.holdout.user_idx.tolist())) == 3
    assert a.holdout.user_idx.tolist() == b.holdout.user_idx.tolist()
    assert len(a.holdout_seen) == 3


def test_leave_one_out_holds_out_each_users_last_positive():
    ev = _events(
        [
            (1, 1, "click", 0),
            (1, 2, "click", 60),
            (1, 3, "skip", 90),  # negative after the last positive: not a target, still in no history
            (2, 4, "save", 0),
            (2, 5, "click", 30),  # same second as the next: the row order decides
            (2, 6, "click", 30),
        ]
    )
    cfg = ExamplesConfig(split="leave_one_out", validation=False, max_seq_len=4)
    ex = build_examples(ev, _users([1, 2]), _items(list(range(1, 7))), T0 + pd.Timedelta(days=1), cfg)
    v = ex.vocab
    assert sorted(ex.holdout.target_items.tolist()) == [_id(v, 2), _id(v, 6)]
    assert sorted(ex.train.target_items.tolist()) == [_id(v, 1), _id(v, 4), _id(v, 5)]
    u2 = int(np.flatnonzero(ex.holdout.target_items == _id(v, 6))[0])
    # sequence order: item 5 shares item 6's second but comes first in the user's sequence
    assert ex.holdout.hist_items[u2].tolist() == [0, 0, _id(v, 4), _id(v, 5)]


def test_validation_split_sits_between_train_and_holdout():
    ev = _events(
        [(1, 1, "click", 0), (1, 2, "click", DAY + 5), (1, 3, "click", 2 * DAY + 5), (2, 4, "click", 2 * DAY + 9)]
    )
    cfg = ExamplesConfig(split="time", validation=True)
    ex = build_examples(ev, _users([1, 2]), _items([1, 2, 3, 4]), T0 + pd.Timedelta(days=3), cfg)
    v = ex.vocab
    assert ex.train.target_items.tolist() == [_id(v, 1)]
    assert ex.valid.target_items.tolist() == [_id(v, 2)]
    assert ex.holdout.target_items.tolist() == [_id(v, 3), _id(v, 4)]
    loo = build_examples(
        ev, _users([1, 2]), _items([1, 2, 3, 4]), T0 + pd.Timedelta(days=3),
        ExamplesConfig(split="leave_one_out", validation=True),
    )
    assert loo.valid.target_items.tolist() == [_id(v, 2)]  # user 2 has one positive: holdout only
    assert loo.train.target_items.tolist() == [_id(v, 1)]


def test_holdout_seen_lists_every_earlier_action_item_but_not_impressions_or_later_ones():
    ev = _events(
        [
            (1, 1, "click", 0),
            (1, 2, "hide", 10),
            (1, 1, "save", 20),  # repeat: listed once
            (1, 3, "impression", 30),
            (1, 4, "click", 2 * DAY),  # holdout target
            (1, 5, "click", 2 * DAY + 60),  # later: not seen
        ]
    )
    ex = build_examples(ev, _users([1]), _items([1, 2, 3, 4, 5]), T0 + pd.Timedelta(days=3), ExamplesConfig(**TIME))
    v = ex.vocab
    assert ex.holdout_seen.row(0).tolist() == sorted([_id(v, 1), _id(v, 2)])


def test_unknown_items_are_dropped_and_unknown_users_get_index_zero():
    ev = _events([(1, 1, "click", 0), (1, 99, "click", 5), (7, 2, "click", 9), (1, 2, "click", 2 * DAY)])
    ex = build_examples(ev, _users([1]), _items([1, 2]), T0 + pd.Timedelta(days=3), ExamplesConfig(**TIME))
    assert ex.meta["n_dropped_unknown_items"] == 1
    assert ex.train.user_idx.tolist() == [1, 0]


def test_bad_inputs_and_empty_splits_raise_named_errors():
    users, items = _users([1]), _items([1])
    with pytest.raises(ContractError, match="action"):
        build_examples(_events([(1, 1, "like", 0)]), users, items, T0 + pd.Timedelta(days=3), ExamplesConfig(**TIME))
    with pytest.raises(ExamplesError, match="holdout split is empty"):
        build_examples(_events([(1, 1, "click", 0)]), users, items, T0 + pd.Timedelta(days=3), ExamplesConfig(**TIME))


# --------------------------------------------------------------------------------------------- batches, files


def _toy_examples() -> Examples:
    ev = _events(
        [(1, 1, "click", 0), (1, 2, "skip", 5, "related", 1), (2, 2, "save", 7), (1, 3, "click", 2 * DAY, "related", 2)]
    )
    users = _users([1, 2], country=["fr", "de"])
    items = _items([1, 2, 3], genres=["a|b", "b", None], features=[[1.0], [2.0], [3.0]])
    return build_examples(ev, users, items, T0 + pd.Timedelta(days=3), ExamplesConfig(max_seq_len=2, validation=False))


def test_to_batch_gathers_rows_and_user_features():
    ex = _toy_examples()
    b = ex.holdout.to_batch(np.array([0]), ex.user_feats)
    assert b.hist_items.tolist() == [[1, 2]] and b.hist_actions.tolist() == [[2, 5]]
    assert b.context_items.tolist() == [2] and b.surface.tolist() == [1] and b.target_items.tolist() == [3]
    assert b.user_feats.tolist() == [[ex.user_feats[1, 0]]] and b.user_feats.dtype == torch.int64
    assert len(ex.train.take(np.array([1, 0]))) == 2


def test_examples_save_and_load_round_trip(tmp_path):
    ex = _toy_examples()
    ex.save(tmp_path / "examples")
    ex.save(tmp_path / "examples")  # overwriting a finished directory is fine
    back = Examples.load(tmp_path / "examples")
    for name in ("hist_items", "hist_gaps", "context_items", "target_items", "ts", "user_idx"):
        assert np.array_equal(getattr(back.train, name), getattr(ex.train, name))
    assert np.array_equal(back.holdout_seen.indices, ex.holdout_seen.indices)
    assert torch.equal(back.item_feats.dense, ex.item_feats.dense)
    assert back.vocab.item_ids.tolist() == ex.vocab.item_ids.tolist() and back.meta == ex.meta
    assert back.valid is None
    with pytest.raises(ExamplesError, match="meta.json"):
        Examples.load(tmp_path / "missing")


def test_sequence_examples_reject_misaligned_arrays_and_seen_items_take_rows():
    e = SequenceExamples.empty(4)
    with pytest.raises(ExamplesError, match="rows"):
        SequenceExamples(**{**e.__dict__, "ts": np.zeros(2, dtype=np.int64)})
    seen = SeenItems.from_lists([[3, 1, 3], [], [2]])
    assert seen.indptr.tolist() == [0, 2, 2, 3] and seen.take(np.array([2, 0])).indices.tolist() == [2, 1, 3]
    masked = seen.take(np.array([True, True, False]))
    assert masked.indptr.tolist() == [0, 2, 2] and masked.indices.tolist() == [1, 3]


def test_search_queries_become_example_tokens_and_survive_save_load(tmp_path):
    from towerflow.models.query import encode_texts

    ev = _events([(1, 1, "click", 10, "search"), (1, 2, "click", 20, "homefeed"), (2, 3, "click", 30, "search"),
                  (1, 3, "click", DAY + 5, "search")])
    ev["query"] = ["Red shoes", "stray", None, "hats"]  # the homefeed row's query is not one the service gets
    items = _items([1, 2, 3], category=["shoes", "shoes", "hats"])
    items["title"] = ["Red shoe", None, "Blue hat"]
    ex = build_examples(ev, _users([1, 2]), items, T0 + pd.Timedelta(days=2), ExamplesConfig(**TIME))
    want = encode_texts(["Red shoes", None, None])
    assert ex.train.query.shape == want.shape == (3, 10)  # "red shoes": 2 words + 3 + 5 trigrams
    assert np.array_equal(ex.train.query, want)
    assert np.array_equal(ex.holdout.query, encode_texts(["hats"]))
    assert ex.item_text == ["", "Red shoe shoes", "shoes", "Blue hat hats"]
    assert np.array_equal(ex.item_feats.text.numpy(), encode_texts(ex.item_text))
    assert np.array_equal(ex.train.to_batch(np.array([0]), ex.user_feats).query.numpy(), want[:1])
    ex.save(tmp_path / "examples")
    back = Examples.load(tmp_path / "examples")
    assert np.array_equal(back.train.query, ex.train.query) and back.item_text == ex.item_text
    assert torch.equal(back.item_feats.text, ex.item_feats.text)
