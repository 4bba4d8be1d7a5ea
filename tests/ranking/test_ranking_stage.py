"""The retrain's ranking stage as pure functions: the time split, the baselines, the champion comparison and the gate.

Hand-made logs for the numbers; a small slate world (real generator, real training) for a bad ranker the gate fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from towerflow.config import RankerConfig, RankerGateConfig, RankerStageConfig, RankerTrainConfig
from towerflow.contract import conform
from towerflow.tasks.ranking_stage import (
    DAY_US,
    RankerEvaluation,
    evaluate_ranking_stage,
    has_negatives,
    popularity,
    ranking_data,
)
from towerflow.tasks.vocabulary import Vocab
from towerflow.validation.ranker import gate_ranker

T0 = pd.Timestamp("2026-01-01", tz="UTC")
END_US = (T0 + pd.Timedelta(days=3)).value // 1000
pytestmark = pytest.mark.usefixtures("one_thread")


def _vocab(item_ids) -> Vocab:
    return Vocab(item_ids=np.array(sorted(item_ids), dtype=np.int64), user_ids=np.arange(1, 10, dtype=np.int64),
                 categories=["c"], genres=[], demographic_fields=[], demographic_values=[])


def _events(rows) -> pd.DataFrame:
    """rows: (user, item, action, hours after T0)."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "h"])
    df.insert(0, "event_id", [f"e{i}" for i in range(len(df))])
    df["ts"] = T0 + pd.to_timedelta(df.pop("h"), unit="h")
    df["surface"], df["context_item_id"], df["query"] = "homefeed", None, None
    return conform(df, "events")


# days 0 and 1 train, day 2 (hours 48..71) is held out; each row is its own request (no request_id)
LOG = _events([(1, 10, "click", 1), (1, 11, "impression", 2), (2, 10, "save", 3), (2, 12, "impression", 25),
               (1, 10, "click", 26), (3, 11, "hide", 27), (1, 12, "impression", 49), (2, 10, "click", 50),
               (3, 11, "impression", 51), (3, 99, "click", 52)])


def test_the_split_is_by_time_capped_to_the_latest_requests_and_renumbered():
    cfg = RankerStageConfig(train=RankerTrainConfig(model=RankerConfig(max_seq_len=3, latest_k=1)))
    data = ranking_data(LOG, _vocab([10, 11, 12]), cfg, END_US, max_history_days=365)
    assert data.cut_us == END_US - DAY_US
    assert len(data.train) == 6 and len(data.holdout) == 3  # item 99 is not in the vocabulary
    assert data.holdout.request.tolist() == [0, 1, 2] and data.holdout.item.tolist() == [3, 1, 2]
    assert data.holdout.labels[:, 0].tolist() == [0, 1, 0]  # click head: only user 2's item 10
    # user 1's request at hour 49 sees their two earlier clicks of item 10 (row 1), latest last; S = 3, left-padded
    assert data.holdout.hist_items[0].tolist() == [0, 1, 1]
    capped = ranking_data(LOG, _vocab([10, 11, 12]), cfg.model_copy(update={"max_train_requests": 2,
                                                                            "max_holdout_requests": 1}),
                          END_US, 365)
    assert capped.train.request.tolist() == [0, 1] and capped.train.item.tolist() == [1, 2]  # hours 26, 27
    assert capped.holdout.item.tolist() == [2] and capped.holdout.request.tolist() == [0]  # hour 51


def test_popularity_counts_positives_before_the_cut_and_negatives_are_detected():
    vocab = _vocab([10, 11, 12])
    assert popularity(LOG, vocab, END_US - DAY_US).tolist() == [0, 3, 0, 0]  # 2 clicks + 1 save of item 10
    assert popularity(LOG, vocab, END_US).tolist() == [0, 4, 0, 0]
    assert has_negatives(LOG) and has_negatives(LOG[LOG["action"] != "impression"])  # a hide is left
    assert not has_negatives(LOG[LOG["action"].isin(["click", "save"])])


def _ev(candidate: float, pop: float, champion: float | None = None, n_requests: int = 50) -> RankerEvaluation:
    def m(v: float) -> dict[str, float]:
        return {"auc/mean": v, "auc/click": v, "auc/hide": v}

    return RankerEvaluation(candidate=m(candidate), baselines={"popularity": m(pop), "profile_dot": m(0.55)},
                            n_rows=3 * n_requests, n_requests=n_requests,
                            champion=None if champion is None else m(champion),
                            candidate_on_shared=None if champion is None else m(candidate), champion_release="r-x",
                            n_shared_rows=100)


def test_gate_rule_by_hand():
    gate = RankerGateConfig(min_lift_over_baselines=0.0, max_regression=0.01, min_holdout_requests=20)
    ok = gate_ranker(_ev(0.62, 0.60), gate)
    assert ok.passed and "judged against baselines only" in ok.check("vs_champion").detail
    bad = gate_ranker(_ev(0.58, 0.60), gate)  # below popularity, above profile_dot
    assert [c.name for c in bad.failed_checks] == ["vs_popularity"]
    assert "lift -0.0200" in bad.summary()
    assert gate_ranker(_ev(0.62, 0.60, champion=0.625), gate).passed  # within 0.01 of the champion's ranker
    worse = gate_ranker(_ev(0.62, 0.60, champion=0.64), gate)
    assert [c.name for c in worse.failed_checks] == ["vs_champion"]
    assert {c.name for c in worse.warnings} == {"vs_champion auc/click", "vs_champion auc/hide"}
    assert [c.name for c in gate_ranker(_ev(0.7, 0.6, n_requests=5), gate).failed_checks] == ["holdout_requests"]
    assert [c.name for c in bad.warnings] == []  # 0.58 beats profile_dot's 0.55
    strict = gate.model_copy(update={"blocking_baselines": ("popularity", "profile_dot")})
    assert [c.name for c in gate_ranker(_ev(0.54, 0.50), strict).failed_checks] == ["vs_profile_dot"]
    assert [c.name for c in gate_ranker(_ev(0.54, 0.50), gate).warnings] == ["vs_profile_dot"]
    assert "| auc/mean | 0.6200 | 0.6000 | 0.5500 | 0.6200 | 0.6400 |" in worse.to_markdown()


@dataclass
class FakeChampion:
    """What evaluate_ranking_stage reads of a loaded release."""

    release_id: str
    ranker: object
    vocab_dir: Path


@pytest.fixture(scope="module")
def item_world():
    """3 days, 10 items, 40 users each shown one random item per hour: items 1-5 are clicked, 6-9 ignored, 10
    hidden, so the item alone tells every label (popularity orders them almost perfectly)."""
    rng = np.random.default_rng(0)
    rows = []
    for h in range(72):
        for u in range(1, 41):
            item = int(rng.integers(1, 11))
            rows.append((u, item, "click" if item <= 5 else "hide" if item == 10 else "impression", h + u / 100))
    events, vocab = _events(rows), _vocab(range(1, 11))
    vocab.user_ids = np.arange(1, 41, dtype=np.int64)
    table = np.eye(11, 4, k=-1, dtype=np.float32) + np.random.default_rng(1).normal(0, 0.1, (11, 4)).astype(
        np.float32)
    table[0] = 0
    cfg = RankerStageConfig(train=RankerTrainConfig(model=RankerConfig(max_seq_len=4, latest_k=2, item_dim=4,
                                                                       mlp_hidden=(16,), item_id_embedding=True),
                                                    epochs=3, batch_size=256, lr=1e-2))
    return events, vocab, table, cfg, ranking_data(events, vocab, cfg, END_US, 365)


def test_a_ranker_that_orders_backwards_fails_the_gate_and_a_champion_is_compared_on_shared_rows(
        item_world, tmp_path):
    from towerflow.tasks.train_ranker import train_ranker

    events, vocab, table, cfg, data = item_world
    good = train_ranker(data.train, table, cfg.train, log=False).model
    ev_good = evaluate_ranking_stage(good, data, events, vocab, table, 365)
    assert ev_good.candidate["auc/click"] > 0.95 and ev_good.baselines["popularity"]["auc/click"] > 0.95
    assert gate_ranker(ev_good, RankerGateConfig(min_lift_over_baselines=-0.05)).passed
    bad = train_ranker(data.train, table, cfg.train, log=False).model
    with torch.no_grad():  # the same ranker with its heads negated: every head orders the shown items backwards
        bad.heads.weight.neg_()
        bad.heads.bias.neg_()
    ev_bad = evaluate_ranking_stage(bad, data, events, vocab, table, 365)
    assert ev_bad.candidate["auc/click"] == pytest.approx(1 - ev_good.candidate["auc/click"], abs=1e-9)
    judged = gate_ranker(ev_bad, RankerGateConfig())
    assert [c.name for c in judged.failed_checks] == ["vs_popularity"]
    assert [c.name for c in judged.warnings] == ["vs_profile_dot"]  # reported; blocking only when configured

    # the champion's ranker on its own vocabulary: it lacks item 7, so it is judged on the rows it knows (item 7 is
    # only ever shown, never in a sequence: both rankers read the same sequences, so the same weights agree exactly)
    known = vocab.item_ids[vocab.item_ids != 7]
    champ_vocab = _vocab(known)
    (tmp_path / "vocab.json").write_text(champ_vocab.to_json())
    champ_rows = np.r_[0, vocab.item_index(known)]
    with torch.random.fork_rng(devices=[]):
        from towerflow.models.ranker import Ranker

        champ = Ranker(torch.from_numpy(table[champ_rows]), good.cfg)
    state = good.state_dict()
    state["item_id.weight"] = state["item_id.weight"][torch.from_numpy(champ_rows)]
    champ.load_state_dict(state)  # the good ranker, its id embedding re-indexed to the champion's vocabulary
    ev = evaluate_ranking_stage(good, data, events, vocab, table, 365,
                                champion=FakeChampion("r-champ", champ.eval(), tmp_path))
    shared = np.isin(vocab.item_ids[data.holdout.item - 1], known)
    assert ev.n_shared_rows == int(shared.sum()) < ev.n_rows
    # the same weights over the same rows: the same numbers
    for k, v in ev.champion.items():
        assert v == pytest.approx(ev.candidate_on_shared[k], abs=1e-6) or (np.isnan(v) and np.isnan(
            ev.candidate_on_shared[k])), k
    result = gate_ranker(ev, RankerGateConfig(min_lift_over_baselines=-1.0))
    assert result.check("vs_champion").passed and "champion r-champ" in result.to_markdown()
    json.dumps(ev.candidate)  # plain floats
