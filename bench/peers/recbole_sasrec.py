"""RecBole 1.2.1's SASRec on sequences towerflow exported: runs in the peer's OWN venv (``make peer-recbole``).

Never imported by towerflow (RecBole needs numpy 1 and pandas 2; the product runs numpy 2 and pandas 3): it
reads ``sequences.npz`` and writes ``scores.npy`` and ``result.json``, nothing else crosses the boundary.

    .venv-recbole/bin/python bench/peers/recbole_sasrec.py --work DIR [--epochs 30] [--threads 1] ...

Input ``DIR/sequences.npz``: ``indptr`` (n_users + 1,) and ``items`` (towerflow item indices 1..n_items), row r =
one user's actions in sequence order, the last one the holdout target; ``n_items``.

Training is RecBole's own: the sequences become an atomic ``.inter`` file whose timestamp is the position (so its
leave-one-out split, ``LS: valid_and_test`` ordered by time, cuts exactly where towerflow cut: the last action is
the test target, the one before it the validation target early stopping watches), SASRec with its default
hyper-parameters and ``loss_type: CE`` over all items. Two fixes (docs/architecture.md, "Dependency pins"):
importing RecBole's sequential models switches ``torch.autograd.set_detect_anomaly`` on process-wide (2.8x slower),
so it is switched off; its checkpoints need ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` to reload under torch 2.6+.

Scoring is NOT RecBole's evaluator (which does not exclude seen items for sequential models): the best checkpoint
scores every item for each user's history (the sequence without its last action, the last ``--seq-len`` of it), and
``scores.npy`` (n_users, n_items + 1) goes back to towerflow, which ranks it with the same code as its own model.
RecBole's own test metrics (seen items not excluded) are kept in ``result.json`` for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def write_atomic(work: Path, indptr: np.ndarray, items: np.ndarray) -> Path:
    """``work/ml/ml.inter``: user token = row, item token = towerflow item index, timestamp = position."""
    (work / "ml").mkdir(parents=True, exist_ok=True)
    path = work / "ml" / "ml.inter"
    with path.open("w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for r in range(len(indptr) - 1):
            for k, item in enumerate(items[indptr[r] : indptr[r + 1]]):
                f.write(f"{r}\t{int(item)}\t{k}\n")
    return path


def recbole_config(args: argparse.Namespace) -> dict:
    return {
        "data_path": str(args.work),
        "checkpoint_dir": str(args.work / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": args.seq_len,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "epochs": args.epochs,
        "stopping_step": args.patience,
        "train_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "show_progress": False,
        "worker": 0,
    }


def history_batch(indptr: np.ndarray, items: np.ndarray, token_id: dict, seq_len: int):
    """Left-aligned, zero-padded (n, seq_len) RecBole item ids of each row's history, and the lengths."""
    n = len(indptr) - 1
    seq = np.zeros((n, seq_len), dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    for r in range(n):
        hist = items[indptr[r] : indptr[r + 1] - 1][-seq_len:]
        ids = [token_id[str(int(i))] for i in hist]
        seq[r, : len(ids)] = ids
        length[r] = len(ids)
    return seq, length


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="holds sequences.npz; outputs are written here")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5, help="RecBole's stopping_step (validation NDCG@10)")
    p.add_argument("--seq-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=2020)
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    sys.argv = sys.argv[:1]  # RecBole's Config parses the command line too and warns about every flag above
    warnings.filterwarnings("ignore", category=FutureWarning)  # its torch.cuda.amp call, on every run

    import torch

    torch.set_num_threads(args.threads)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    torch.autograd.set_detect_anomaly(False)  # RecBole's sequential package turned it on at import

    data = np.load(args.work / "sequences.npz")
    indptr, items, n_items = data["indptr"], data["items"], int(data["n_items"])
    write_atomic(args.work, indptr, items)
    os.chdir(args.work)  # RecBole writes ./log and ./log_tensorboard
    config = Config(model="SASRec", dataset="ml", config_dict=recbole_config(args))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to(config["device"])
    torch.autograd.set_detect_anomaly(False)
    trainer = Trainer(config, model)

    valid_history: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                                callback_fn=lambda epoch, score: valid_history.append((epoch, float(score))))
    train_s = time.perf_counter() - t0
    recbole_test = {k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=True).items()}

    checkpoint = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    token_id = dataset.field2token_id["item_id"]
    seq, length = history_batch(indptr, items, token_id, args.seq_len)
    with torch.no_grad():
        recbole_scores = model.full_sort_predict({model.ITEM_SEQ: torch.from_numpy(seq),
                                                  model.ITEM_SEQ_LEN: torch.from_numpy(length)}).numpy()
    # back to towerflow's item order; an item RecBole never saw cannot be ranked by it
    scores = np.full((len(seq), n_items + 1), -np.inf, dtype=np.float32)
    for token, rid in token_id.items():
        if token != "[PAD]":
            scores[:, int(token)] = recbole_scores[:, rid]
    np.save(args.work / "scores.npy", scores)
    result = {
        "train_seconds": round(train_s, 1),
        "epochs": len(trainer.train_loss_dict),
        "best_epoch": max(valid_history, key=lambda e: e[1])[0] + 1 if valid_history else None,
        "best_valid_ndcg@10": float(best_valid),
        "valid_history": valid_history,
        "recbole_test_seen_not_excluded": recbole_test,
        "torch_threads": torch.get_num_threads(),
        "config": {k: config[k] for k in ("n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob",
                                          "attn_dropout_prob", "MAX_ITEM_LIST_LENGTH", "learning_rate",
                                          "train_batch_size", "epochs", "stopping_step", "loss_type", "seed")},
    }
    (args.work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("train_seconds", "epochs", "best_epoch")}), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
