"""The peer export (bench/peer.py): a peer library sees exactly towerflow's leave-one-out split, or an error."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from bench.peer import PeerError, loo_sequences, run_peer
from tests.scripts import load_script
from tests.unit.test_build_examples import T0, _events, _items, _users
from towerflow.config import ExamplesConfig
from towerflow.tasks.build_examples import build_examples
from towerflow.tasks.evaluate import metrics_from_ranks, target_ranks

LOO = ExamplesConfig(split="leave_one_out", validation=True, max_holdout_users=None, max_seq_len=4)
AS_OF = T0 + np.timedelta64(1, "D")

# user 1: ties at t=10 keep row order (items 3 then 2); the trailing skip on item 5 comes after the last positive
# user 2: an impression (not a history action) and a hide before its last positive
ROWS = [
    (1, 1, "click", 0), (1, 3, "save", 10), (1, 2, "click", 10), (1, 4, "skip", 20), (1, 6, "click", 30),
    (1, 5, "skip", 40),
    (2, 2, "click", 0), (2, 6, "impression", 5), (2, 4, "hide", 6), (2, 1, "click", 7), (2, 3, "conversion", 8),
]


def _examples(rows=ROWS):
    events = _events(rows)
    ex = build_examples(events, _users([1, 2]), _items([1, 2, 3, 4, 5, 6]), AS_OF, LOO)
    return events, ex


def test_export_is_each_users_actions_through_the_holdout_target_in_towerflows_order():
    events, ex = _examples()
    seqs = loo_sequences(events, ex)
    by_user = {int(u): seqs.row(r).tolist() for r, u in enumerate(ex.holdout.user_idx)}
    # item ids 1..6 are item indices 1..6 (sorted vocab); impressions left out; user 1's trailing skip dropped
    assert by_user == {1: [1, 3, 2, 4, 6], 2: [2, 4, 1, 3]}
    # holdout rows are in target time order: user 2's target (t=8) before user 1's (t=30)
    assert ex.holdout.user_idx.tolist() == [2, 1] and seqs.indptr.tolist() == [0, 4, 9]


def test_export_refuses_events_that_are_not_the_examples_source():
    events, ex = _examples()
    other = _events([r for r in ROWS if r[1] != 4])  # drop item 4's actions: the seen sets no longer match
    with pytest.raises(PeerError, match="seen items"):
        loo_sequences(other, ex)
    shifted = _events([r if (r[0], r[1]) != (2, 3) else (2, 3, "skip", 8) for r in ROWS])  # user 2's target moves
    with pytest.raises(PeerError, match="holdout target"):
        loo_sequences(shifted, ex)


def test_export_refuses_a_time_split():
    events, ex = _examples()
    ex.meta["split"] = "time"
    with pytest.raises(PeerError, match="leave-one-out"):
        loo_sequences(events, ex)


def test_run_peer_round_trips_scores_and_names_a_missing_environment(tmp_path):
    events, ex = _examples()
    seqs = loo_sequences(events, ex)
    # a stand-in peer in this interpreter: scores each item by how often it occurs in the row's history
    script = tmp_path / "count_peer.py"
    script.write_text(textwrap.dedent("""
        import argparse, json, numpy as np
        p = argparse.ArgumentParser(); p.add_argument("--work"); a = p.parse_args()
        d = np.load(a.work + "/sequences.npz")
        s = np.zeros((len(d["indptr"]) - 1, int(d["n_items"]) + 1), dtype=np.float32)
        for r in range(len(s)):
            np.add.at(s[r], d["items"][d["indptr"][r]:d["indptr"][r + 1] - 1], 1.0)
            s[r, d["items"][d["indptr"][r + 1] - 1]] += 0.5
        np.save(a.work + "/scores.npy", s)
        json.dump({"epochs": 0}, open(a.work + "/result.json", "w"))
    """))
    scores, result = run_peer(script, seqs, ex.vocab.n_items, [], python=sys.executable)
    assert result == {"epochs": 0} and scores.shape == (2, 7)
    # seen items excluded, each target (score 0.5) outranks every unseen item (score 0): rank 1 for both users
    ranks = target_ranks(lambda rows: scores[rows], ex.holdout.target_items, ex.vocab.n_items, ex.holdout_seen)
    assert ranks.tolist() == [1, 1]
    # without the exclusion the seen items (score 1) rank above it: user 1 has 4 of them, user 2 has 3
    unmasked = target_ranks(lambda rows: scores[rows], ex.holdout.target_items, ex.vocab.n_items)
    assert sorted(unmasked.tolist()) == [4, 5]
    assert metrics_from_ranks(unmasked, ks=(4,))["hr@4"] == 0.5

    with pytest.raises(PeerError, match="make peer-recbole"):
        run_peer(script, seqs, ex.vocab.n_items, [], python=tmp_path / "missing" / "python")
    bad = tmp_path / "failing_peer.py"
    bad.write_text("raise SystemExit(3)\n")
    with pytest.raises(PeerError, match="status 3"):
        run_peer(bad, seqs, ex.vocab.n_items, [], python=sys.executable)


def test_sasrec_peer_writes_positions_as_time_and_scores_each_history_without_its_target(tmp_path):
    peer = load_script("bench/peers/recbole_sasrec.py")  # its top level needs only numpy
    indptr, items = np.array([0, 3, 7]), np.array([5, 2, 9, 1, 2, 3, 4])  # row 0 ends at target 9, row 1 at 4
    path = peer.write_atomic(tmp_path, indptr, items)
    assert path.read_text().splitlines() == [
        "user_id:token\titem_id:token\ttimestamp:float",
        "0\t5\t0", "0\t2\t1", "0\t9\t2", "1\t1\t0", "1\t2\t1", "1\t3\t2", "1\t4\t3"]
    # RecBole's ids (1.. in order of appearance) differ from towerflow's; history = all but the last, last seq_len
    token_id = {"[PAD]": 0, "5": 1, "2": 2, "9": 3, "1": 4, "3": 5, "4": 6}
    seq, length = peer.history_batch(indptr, items, token_id, seq_len=2)
    assert seq.tolist() == [[1, 2], [2, 5]] and length.tolist() == [2, 2]  # row 1: [1, 2, 3] cut to [2, 3]
    seq, length = peer.history_batch(indptr, items, token_id, seq_len=4)
    assert seq.tolist() == [[1, 2, 0, 0], [4, 2, 5, 0]] and length.tolist() == [2, 3]  # left-aligned, zero-padded
