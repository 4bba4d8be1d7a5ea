"""Model, embedding, index and release gates, and the result object they share. Real FAISS, hand-worked numbers."""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pytest

from towerflow.config import GateConfig
from towerflow.errors import TowerflowError
from towerflow.validation.embeddings import check_embeddings
from towerflow.validation.index import check_index_recall
from towerflow.validation.model import gate_model, slices_by_name
from towerflow.validation.release import check_release
from towerflow.validation.result import Check, GateFailed, GateResult

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- result object


def test_result_reports_blocking_failures_and_warnings():
    result = GateResult(
        "demo",
        [
            Check("rows", False, np.int64(3), 0, "3 rows bad", ["x|y", np.int64(7)]),
            Check("slice", False, 0.1, 0.2, "slice dipped", blocking=False),
            Check("ok", True, 1.0, 0.5),
        ],
    )
    assert not result.passed
    assert [c.name for c in result.failed_checks] == ["rows"]
    assert [c.name for c in result.warnings] == ["slice"]
    assert result.summary() == (
        "demo gate FAILED (1 of 2 checks): rows: 3 rows bad, e.g. ['x|y', 7] [warnings: slice: slice dipped]"
    )
    md = result.to_markdown()
    assert "| rows | **FAIL** | 3 | 0 | 3 rows bad e.g. ['x\\|y', 7] |" in md  # pipes escaped inside cells
    assert "| slice | warn |" in md
    d = json.loads(json.dumps(result.to_dict()))
    assert d["failed"] == ["rows"] and d["checks"][0]["observed"] == 3
    assert result.to_tags()["gate.demo.passed"] == "false"
    with pytest.raises(GateFailed) as info:
        result.raise_if_failed()
    assert isinstance(info.value, TowerflowError)
    assert str(info.value) == "demo gate failed: 1 of 2 checks\n  - rows: 3 rows bad, e.g. ['x|y', 7]"
    assert info.value.result is result
    copy = pickle.loads(pickle.dumps(info.value))  # Prefect and Dask move exceptions between processes
    assert str(copy) == str(info.value) and copy.result.failed_checks[0].name == "rows"


def test_warnings_alone_do_not_fail_a_gate():
    result = GateResult("demo", [Check("slice", False, blocking=False), Check("ok", True)])
    assert result.passed
    result.raise_if_failed()


# ---------------------------------------------------------------- model gate

POP = {"popularity": {"recall@10": 0.10, "ndcg@10": 0.05}}


def test_model_worse_than_champion_fails():
    result = gate_model({"recall@10": 0.20, "ndcg@10": 0.12}, {"recall@10": 0.25, "ndcg@10": 0.12}, POP, {}, GateConfig())
    assert [c.name for c in result.failed_checks] == ["recall@10 vs champion"]
    check = result.check("recall@10 vs champion")
    assert (check.observed, check.threshold) == (0.20, pytest.approx(0.23))
    with pytest.raises(GateFailed, match=r"recall@10 vs champion: candidate 0.2000 vs champion 0.2500 \(-0.0500; allowed -0.02\)"):
        result.raise_if_failed()


def test_model_within_tolerance_of_champion_passes_and_ndcg_is_gated_too():
    ok = gate_model({"recall@10": 0.24, "ndcg@10": 0.12}, {"recall@10": 0.25, "ndcg@10": 0.13}, POP, {}, GateConfig())
    assert ok.passed, ok.summary()
    worse_ndcg = gate_model({"recall@10": 0.25, "ndcg@10": 0.09}, {"recall@10": 0.25, "ndcg@10": 0.13}, POP, {}, GateConfig())
    assert [c.name for c in worse_ndcg.failed_checks] == ["ndcg@10 vs champion"]


def test_first_release_is_judged_against_baselines_only():
    passing = gate_model({"recall@10": 0.15, "ndcg@10": 0.07}, None, POP, {}, GateConfig())
    assert passing.passed
    assert "first release" in passing.check("recall@10 vs champion").detail
    failing = gate_model({"recall@10": 0.09, "ndcg@10": 0.07}, None, POP, {}, GateConfig())
    assert [c.name for c in failing.failed_checks] == ["recall@10 vs popularity"]


def test_lift_margin_and_missing_baseline():
    cfg = GateConfig(min_lift_over_popularity=0.02)
    result = gate_model({"recall@10": 0.11, "ndcg@10": 0.07}, None, POP, {}, cfg)
    assert result.check("recall@10 vs popularity").threshold == pytest.approx(0.12)
    assert not result.passed
    no_pop = gate_model({"recall@10": 0.5, "ndcg@10": 0.3}, None, {}, {}, GateConfig())
    assert no_pop.check("recall@10 vs popularity").detail == "no popularity baseline value to compare with"
    assert not no_pop.passed


def test_nan_candidate_metric_fails():
    result = gate_model({"recall@10": float("nan"), "ndcg@10": 0.1}, {"recall@10": 0.2, "ndcg@10": 0.1}, POP, {}, GateConfig())
    assert {c.name for c in result.failed_checks} == {"recall@10 vs champion", "recall@10 vs popularity"}


def test_slices_and_weak_baselines_are_reported_without_blocking():
    slices = {
        "related": {"candidate": {"recall@10": 0.30}, "champion": {"recall@10": 0.40}},
        "search": {"candidate": {"recall@10": 0.20}, "popularity": {"recall@10": 0.05}},
    }
    baselines = {**POP, "random": {"recall@10": 0.01}}
    result = gate_model({"recall@10": 0.26, "ndcg@10": 0.13}, {"recall@10": 0.25, "ndcg@10": 0.13}, baselines, slices, GateConfig())
    assert result.passed
    assert [c.name for c in result.warnings] == ["slice related: recall@10 vs champion"]
    assert result.check("slice search: recall@10 vs popularity").passed
    assert result.check("recall@10 vs random").passed
    md = result.to_markdown()
    assert "| slice related | recall@10 | 0.3000 | 0.4000 |  |  |" in md
    assert "| overall | recall@10 | 0.2600 | 0.2500 | 0.1000 | 0.0100 |" in md


def test_slices_by_name_transposes_the_evaluator_output():
    cand = {"all": {"recall@10": 0.3}, "surface=related": {"recall@10": 0.4, "n": 120.0}}
    champ = {"all": {"recall@10": 0.2}, "surface=related": {"recall@10": 0.5}}
    base = {"popularity": {"all": {"recall@10": 0.1}, "surface=related": {"recall@10": 0.05}}}
    slices = slices_by_name(cand, champ, base)
    assert slices == {
        "surface=related": {
            "candidate": {"recall@10": 0.4, "n": 120.0},
            "champion": {"recall@10": 0.5},
            "popularity": {"recall@10": 0.05},
        }
    }
    result = gate_model(cand["all"] | {"ndcg@10": 0.1}, None, {"popularity": base["popularity"]["all"]}, slices, GateConfig())
    assert "| slice surface=related | n | 120 |  |  |" in result.to_markdown()


# ---------------------------------------------------------------- embedding health


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_healthy_embeddings_pass():
    result = check_embeddings(_unit(np.random.default_rng(0).normal(size=(500, 32))), GateConfig(), seed=0)
    assert result.passed, result.summary()
    assert abs(result.check("no collapse").observed) < 0.05  # random directions in 32-d are nearly orthogonal


def test_collapsed_embeddings_fail():
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(1, 32)) + 0.01 * rng.normal(size=(500, 32)))  # all nearly the same direction
    result = check_embeddings(vectors, GateConfig(), seed=0)
    assert [c.name for c in result.failed_checks] == ["no collapse"]
    assert result.check("no collapse").observed > 0.99


def test_mean_cosine_is_exact_for_two_vectors():
    vectors = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)  # cosine 0.6: every sampled pair is (0,1) or (1,0)
    assert check_embeddings(vectors, GateConfig(), seed=1).check("no collapse").observed == pytest.approx(0.6)
    assert not check_embeddings(vectors, GateConfig(max_mean_cosine=0.5), seed=1).passed


def test_nan_and_inf_embeddings_are_counted():
    vectors = _unit(np.random.default_rng(1).normal(size=(50, 8)))
    vectors[3, 0] = np.nan
    vectors[7, :2] = np.inf
    result = check_embeddings(vectors, GateConfig(), seed=0)
    assert [c.name for c in result.failed_checks] == ["finite"]
    check = result.check("finite")
    assert (check.observed, check.examples) == (2, [3, 7])
    assert check.detail == "2 of 50 vectors hold NaN/inf (1 NaN and 2 inf values)"


def test_norms_off_unit_fail():
    vectors = _unit(np.random.default_rng(2).normal(size=(20, 8)))
    vectors[[4, 9]] *= 2.0
    result = check_embeddings(vectors, GateConfig(), seed=0)
    assert [c.name for c in result.failed_checks] == ["unit norm"]
    assert result.check("unit norm").observed == pytest.approx(1.0, abs=1e-6)
    assert result.check("unit norm").examples == [4, 9]
    assert check_embeddings(vectors, GateConfig(), seed=0, normalized=False).passed


# ---------------------------------------------------------------- index gate


@pytest.fixture(scope="module")
def clustered():
    """2,000 unit item vectors in 20 tight clusters and 200 user vectors drawn near the same clusters."""
    rng = np.random.default_rng(0)
    d, centers = 32, rng.normal(size=(20, 32))
    items = _unit(centers[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, d)))
    users = _unit(centers[rng.integers(0, 20, 200)] + 0.3 * rng.normal(size=(200, d)))
    return items, users


def test_exact_flat_index_has_recall_one(clustered):
    items, users = clustered
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    result = check_index_recall(index.search, items, users, 10, GateConfig())
    assert result.passed
    assert result.check("ann recall@10").observed == 1.0


def test_index_with_item_ids_is_mapped_back_to_rows(clustered):
    items, users = clustered
    ids = np.arange(len(items), dtype=np.int64) * 7 + 1000
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(items.shape[1]))
    index.add_with_ids(items, ids)
    assert check_index_recall(index.search, items, users, 10, GateConfig(), item_ids=ids).check("ann recall@10").observed == 1.0
    # without the id map the returned ids are read as rows of item_vectors: nearly every result is a miss
    unmapped = check_index_recall(index.search, items, users, 10, GateConfig())
    assert not unmapped.passed
    assert unmapped.check("ann recall@10").observed < 0.01


def test_weak_ivf_index_fails(clustered):
    items, users = clustered
    quantizer = faiss.IndexFlatIP(items.shape[1])
    index = faiss.IndexIVFFlat(quantizer, items.shape[1], 50, faiss.METRIC_INNER_PRODUCT)
    index.train(items)
    index.add(items)
    index.nprobe = 1  # one list of 50: neighbours in the other lists of a cluster are never seen
    result = check_index_recall(index.search, items, users, 10, GateConfig())
    assert not result.passed
    assert result.check("ann recall@10").observed < 0.9
    assert "ann recall@10: mean recall@10" in str(pytest.raises(GateFailed, result.raise_if_failed).value)


def test_starved_hnsw_fails(clustered):
    items, users = clustered
    index = faiss.IndexHNSWFlat(items.shape[1], 4, faiss.METRIC_INNER_PRODUCT)
    index.add(items)
    index.hnsw.efSearch = 1
    assert not check_index_recall(index.search, items, users, 10, GateConfig()).passed


def test_recall_counts_ties_padding_and_repeats_by_hand():
    items = np.array([[1, 0], [1, 0], [0, 1], [-1, 0]], dtype=np.float32)  # rows 0 and 1 tie for query [1, 0]
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # query 0 top-2 = {0, 1}; query 1 top-2 = {2, one of 0/1/3 at score 0}
    answers = np.array([[1, 1], [2, -1]])  # q0: row 1 twice (counts once); q1: row 2 then padding

    def search(q, k):
        return np.zeros(answers.shape, np.float32), answers

    result = check_index_recall(search, items, queries, 2, GateConfig())
    assert result.check("ann recall@2").observed == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    tied = np.array([[0, 1], [2, 3]])  # row 3 ties with rows 0 and 1 at score 0 for query 1: a hit
    result = check_index_recall(lambda q, k: (None, tied), items, queries, 2, GateConfig())
    assert result.check("ann recall@2").observed == 1.0


# ---------------------------------------------------------------- release gate


@pytest.fixture(scope="module")
def small_release():
    """A real FAISS index over 100 items and 20 users' vectors, served as serving will: by user id."""
    rng = np.random.default_rng(3)
    items, users = _unit(rng.normal(size=(100, 16))), _unit(rng.normal(size=(20, 16)))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    index.add_with_ids(items, np.arange(100, dtype=np.int64) + 500)

    def answer(request, release="rel-2", drop=0, delay_s=0.0):
        time.sleep(delay_s)
        scores, ids = index.search(users[request["user_id"]][None, :], request["k"])
        pairs = list(zip(ids[0].tolist(), scores[0].tolist(), strict=True))[: request["k"] - drop]
        return {"release": release, "items": [{"item_id": i, "score": s} for i, s in pairs]}

    samples = [{"user_id": u, "context": {"surface": "homefeed"}, "k": 10} for u in range(20)]
    return answer, samples


def test_release_answering_correctly_passes(small_release):
    answer, samples = small_release
    result = check_release(answer, samples, "rel-2", GateConfig())
    assert result.passed, result.summary()
    assert result.check("p99 latency ms").observed < 200


def test_release_with_wrong_release_id_fails(small_release):
    answer, samples = small_release
    result = check_release(lambda r: answer(r, release="rel-1"), samples, "rel-2", GateConfig())
    assert [c.name for c in result.failed_checks] == ["release id"]
    check = result.check("release id")
    assert (check.observed, check.examples) == (20, ["rel-1"])
    with pytest.raises(GateFailed, match="20 of 20 answers named another release than rel-2, e.g. \\['rel-1'\\]"):
        result.raise_if_failed()


def test_release_with_short_answers_or_errors_fails(small_release):
    answer, samples = small_release
    short = check_release(lambda r: answer(r, drop=1), samples, "rel-2", GateConfig())
    assert [c.name for c in short.failed_checks] == ["k items"]
    assert short.check("k items").examples[0] == {"sample": 0, "items": 9, "distinct": 9, "expected": 10}
    broken = check_release(answer, [*samples, {"user_id": 99, "k": 10}], "rel-2", GateConfig())
    assert [c.name for c in broken.failed_checks] == ["answers"]
    assert broken.check("answers").examples == ["sample 20: IndexError: index 99 is out of bounds for axis 0 with size 20"]


def test_slow_release_fails_latency(small_release):
    answer, samples = small_release
    result = check_release(lambda r: answer(r, delay_s=0.02), samples[:4], "rel-2", GateConfig(max_release_latency_ms=5))
    assert [c.name for c in result.failed_checks] == ["p99 latency ms"]
    assert result.check("p99 latency ms").observed >= 20


def test_release_named_by_an_object_is_read(small_release):
    answer, samples = small_release

    @dataclass
    class Release:
        release_id: str

    @dataclass
    class Response:
        release: Release
        items: list

    result = check_release(lambda r: Response(Release("rel-2"), answer(r)["items"]), samples, "rel-2", GateConfig())
    assert result.passed
