"""A peer library's model on towerflow's own leave-one-out split, scored by towerflow's own ranking code.

``loo_sequences`` exports, for each holdout row of ``Examples`` built with ``split="leave_one_out"``, the user's
actions in the order towerflow used (time, then row order) up to and including the holdout target, and checks the
export against the examples: the last action IS the holdout target and the earlier ones ARE the holdout's seen
items, so the peer trains, validates and is tested on exactly this split. ``run_peer`` runs a peer script in its
own interpreter (its own venv: ``make peer-recbole``) and returns its (n_rows, n_items + 1) scores, which
``tasks.evaluate.target_ranks`` ranks with seen items excluded, as for towerflow's model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from towerflow.contract import POSITIVE_ACTIONS
from towerflow.errors import TowerflowError
from towerflow.tasks.build_examples import HISTORY_ACTIONS, Examples

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-recbole" / "bin" / "python"


class PeerError(TowerflowError):
    """The peer's environment is missing, its run failed, or its export disagrees with the examples."""


@dataclass(frozen=True)
class Sequences:
    """CSR rows of towerflow item indices: row r = holdout row r's actions, the last one its holdout target."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    items: np.ndarray  # (indptr[-1],) int64

    def row(self, r: int) -> np.ndarray:
        return self.items[self.indptr[r] : self.indptr[r + 1]]


def loo_sequences(events: pd.DataFrame, ex: Examples) -> Sequences:
    """Each holdout user's history actions (positive and negative, impressions left out) through the holdout target.

    ``events`` are the ones ``ex`` was built from. Raises PeerError when the export does not reproduce the
    examples' holdout targets and seen sets (different events, a time split, or a capped holdout).
    """
    if ex.meta.get("split") != "leave_one_out":
        raise PeerError(f"loo_sequences needs leave-one-out examples; these were split by {ex.meta.get('split')!r}")
    ts = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True))
    item = ex.vocab.item_index(events["item_id"])
    keep = np.asarray(ts < pd.Timestamp(ex.meta["as_of"])) & (item > 0) & events["action"].isin(HISTORY_ACTIONS).to_numpy()
    order = np.flatnonzero(keep)[np.argsort(ts.asi8[keep], kind="stable")]  # ties keep the table's row order
    frame = pd.DataFrame({
        "user": ex.vocab.user_index(events["user_id"].to_numpy()[order]),
        "item": item[order],
        "positive": events["action"].to_numpy()[order].astype(str),
    })
    frame["positive"] = frame["positive"].isin(POSITIVE_ACTIONS)
    frame["pos"] = frame.groupby("user").cumcount()
    last_positive = frame[frame["positive"]].groupby("user")["pos"].max()
    by_user = {u: g["item"].to_numpy()[: last_positive[u] + 1] for u, g in frame.groupby("user") if u in last_positive}

    users = ex.holdout.user_idx
    if (users == 0).any() or len(np.unique(users)) != len(users):
        raise PeerError("holdout rows must be distinct known users (leave-one-out holds out one target per user)")
    rows = []
    for r, u in enumerate(users):
        seq = by_user.get(int(u))
        if seq is None or seq[-1] != ex.holdout.target_items[r]:
            raise PeerError(f"holdout row {r}: exported sequence does not end at the holdout target; "
                            f"pass the events the examples were built from")
        if set(seq[:-1].tolist()) != set(ex.holdout_seen.row(r).tolist()):
            raise PeerError(f"holdout row {r}: exported history differs from the examples' seen items")
        rows.append(seq.astype(np.int64))
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(s) for s in rows])
    return Sequences(indptr, np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))


def run_peer(script: Path, seqs: Sequences, n_items: int, args: list[str], python: Path = PEER_PYTHON,
             work: Path | None = None) -> tuple[np.ndarray, dict]:
    """Run ``python script --work DIR *args`` on ``seqs``; return its scores (n_rows, n_items + 1) and result.json.

    The peer's log lines stream to this process's stdout (its per-epoch progress).
    """
    if not Path(python).exists():
        raise PeerError(f"the peer's environment is missing ({python}); create it with: make peer-recbole")
    with tempfile.TemporaryDirectory(prefix="towerflow-peer-") as tmp:
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        np.savez(work / "sequences.npz", indptr=seqs.indptr, items=seqs.items, n_items=np.int64(n_items))
        env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": ""}
        proc = subprocess.run([str(python), str(script), "--work", str(work), *args], env=env, stdin=subprocess.DEVNULL,
                              stdout=sys.stdout, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            raise PeerError(f"{script.name} exited with status {proc.returncode} (its log is above)")
        scores = np.load(work / "scores.npy")
        result = json.loads((work / "result.json").read_text())
    if scores.shape != (len(seqs.indptr) - 1, n_items + 1):
        raise PeerError(f"{script.name} returned scores of shape {scores.shape}, "
                        f"want {(len(seqs.indptr) - 1, n_items + 1)}")
    return scores, result

