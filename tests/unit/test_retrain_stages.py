"""The retrain's stage logic that the flow's tasks and bench/retrain_e2e.py share: the evaluate stage's champion
scoring (tasks/compare.py), the index gate's holdout queries (validation/index.py) and the release gate's samples
(validation/release.py), on a real tiny world and an untrained (seeded) model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch

from tests.worlds import AS_OF, LOOKBACK, tiny_retrain_config, write_tiny_world
from towerflow.config import GateConfig, IndexConfig
from towerflow.tasks.compare import evaluate_candidate, score_champion
from towerflow.tasks.scoring import user_vectors
from towerflow.tasks.vocabulary import Vocab
from towerflow.validation.index import check_index_recall, gate_index_on_holdout, holdout_queries
from towerflow.validation.release import gate_release_on_holdout, holdout_samples


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from towerflow.data.source import ParquetSource
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.train import init_model

    root = tmp_path_factory.mktemp("stages")
    write_tiny_world(root)
    source = ParquetSource(str(root / "source"))
    end = datetime.combine(AS_OF, datetime.min.time(), tzinfo=UTC)
    config = tiny_retrain_config()
    users = source.read_users()
    examples = build_examples(source.read_events(end - timedelta(days=LOOKBACK), end), users, source.read_items(),
                              end, config.examples)
    torch.manual_seed(0)
    model = init_model(examples, config.train, torch.device("cpu")).eval()
    return examples, users, model, config


def test_the_champion_scored_through_its_own_vocabulary(world):
    examples, users, model, config = world
    ev = evaluate_candidate(model, examples, config.eval)
    assert set(ev.baselines) == {"popularity", "cooccurrence"} and ev.champion is None
    # the same model as champion, through the same vocabulary, scores exactly the candidate's numbers
    same, same_slices = score_champion(model, examples.vocab, examples, users, config.eval)
    assert same == ev.candidate and same_slices == ev.slices
    # a champion whose vocabulary knows none of the holdout's targets cannot retrieve one of them
    targets = examples.vocab.item_ids[examples.holdout.target_items - 1]
    v = examples.vocab
    blind = Vocab(np.setdiff1d(v.item_ids, targets), v.user_ids, v.categories, v.genres, v.demographic_fields,
                  v.demographic_values)
    missed, _ = score_champion(model, blind, examples, users, config.eval)
    assert missed["n"] == ev.candidate["n"] == len(examples.holdout)
    assert missed["recall@10"] == missed["recall@100"] == missed["ndcg@10"] == 0.0


def test_the_index_gate_queries_with_holdout_user_vectors(world):
    examples, _, model, _ = world
    every = user_vectors(model, examples.holdout, examples.user_feats)  # what serving sends, one row per request
    n = len(examples.holdout)
    np.testing.assert_allclose(holdout_queries(model, examples.holdout, examples.user_feats, n + 10), every,
                               rtol=0, atol=1e-6)
    some = holdout_queries(model, examples.holdout, examples.user_feats, 7, seed=3)
    dist = np.abs(some[:, None, :] - every[None, :, :]).max(axis=2)  # (7, n)
    rows = dist.argmin(axis=1).tolist()
    assert dist.min(axis=1).max() < 1e-6  # each query IS a holdout row's user vector (up to batch rounding)
    assert len(some) == len(set(rows)) == 7 and rows == sorted(rows)  # 7 distinct holdout rows, in order


def test_the_index_gate_fails_an_index_that_serves_items_but_not_users(world):
    """An "index" that answers any query with the exact neighbours of the item nearest to it (an item-to-item
    cache) is perfect for queries near item vectors, what the gate used to send; users are not items."""
    examples, _, model, _ = world
    items = model.all_item_vectors().detach().numpy()[1:].astype(np.float32)
    ids = examples.vocab.item_ids
    exact = items @ items.T

    def item_cache(queries, k):
        nearest = np.argmax(queries @ items.T, axis=1)
        top = np.argsort(-exact[nearest], axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact[nearest], top, axis=1), ids[top]

    gates, config = GateConfig(min_index_recall=0.95), IndexConfig(recall_k=20, recall_sample=50)
    rng = np.random.default_rng(0)
    near_items = items[rng.choice(len(items), 50, replace=False)]
    near_items = near_items + rng.normal(0, 0.001, near_items.shape).astype(np.float32)
    assert check_index_recall(item_cache, items, near_items, 20, gates, item_ids=ids).passed
    result = gate_index_on_holdout(item_cache, items, ids, model, examples.holdout, examples.user_feats, config, gates)
    assert not result.passed and result.checks[0].observed < 0.95

    def exact_search(queries, k):
        top = np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :k]
        return None, ids[top]

    ok = gate_index_on_holdout(exact_search, items, ids, model, examples.holdout, examples.user_feats, config, gates)
    assert ok.passed and ok.checks[0].observed == 1.0 and ok.checks[0].name == "ann recall@20"


def test_holdout_samples_spread_over_the_holdout():
    assert holdout_samples(5, 3) == [{"row": r, "k": 3} for r in range(5)]  # fewer rows than 50: all; k <= items
    # linspace(0, 199, 5) = 0, 49.75, 99.5, 149.25, 199 -> rounded (half to even)
    assert [s["row"] for s in holdout_samples(200, 1000, n=5)] == [0, 50, 100, 149, 199]
    assert {s["k"] for s in holdout_samples(200, 1000, n=5)} == {10}
    assert holdout_samples(0, 10) == []


def test_the_release_gate_answers_one_holdout_row_at_a_time_on_one_thread(world):
    examples, _, _, _ = world
    asked, threads = [], torch.get_num_threads()

    def answer_batch(batch, k):
        asked.append((len(batch.target_items), int(batch.context_items[0]), k, torch.get_num_threads()))
        return {"release": "r-1", "items": [{"item_id": i} for i in range(k)]}

    result = gate_release_on_holdout(answer_batch, examples.holdout, examples.user_feats, "r-1", 4, GateConfig())
    rows = [s["row"] for s in holdout_samples(len(examples.holdout), 4)]
    assert result.passed and len(asked) == len(rows) == 50
    assert asked == [(1, int(examples.holdout.context_items[r]), 4, 1) for r in rows]
    assert torch.get_num_threads() == threads  # restored
    wrong = gate_release_on_holdout(lambda b, k: {"release": "r-2", "items": []}, examples.holdout,
                                    examples.user_feats, "r-1", 4, GateConfig())
    assert not wrong.passed and {c.name for c in wrong.checks if not c.passed} == {"release id", "k items"}
