"""Benchmark: MovieLens-100K, leave-one-out, full ranking over every item with seen items excluded.

    make data-ml100k            # once: fetches ML-100K (inside the recbole wheel on PyPI) and converts it
    python -m bench.movielens [--source .towerflow/sources/ml-100k] [--epochs 30] [--threads 1] [--sasrec]

The events are the imported ratings (5 conversion, 4 save, 3 click, 2 skip, 1 hide: towerflow/data/movielens.py).
``ExamplesConfig(split="leave_one_out", validation=True)``: each user's last positive (rating >= 3) is the holdout,
the one before it is the validation example that early stopping watches, every earlier positive is a train target;
a history is the user's earlier ratings (negatives included, as tokens with their action type). Scores are exact
over all 1,682 items, items the user rated before the target excluded, ties counted against the target.

Rows: popularity and item co-occurrence (tasks/evaluate.py, fitted on the train split) and the two-tower model
(the product's code; the flags below set a bigger tower than the demo default, SASRec's size: 2 layers,
d_model 64, and temperature 0.05; everything else is the default of towerflow/config.py). ML-100K has no request context, so pseudo-context augmentation is off. Reported: HR@10,
NDCG@10 (and @50), the epochs run, the best epoch and the training wall time.

``--sasrec`` adds RecBole 1.2.1's SASRec in the same run, trained in its own venv (``make peer-recbole``; RecBole
needs numpy 1 and pandas 2) on exactly this split: ``bench/peer.py`` exports each user's actions through the holdout
target in towerflow's order and checks that the export reproduces the holdout targets and seen sets;
``bench/peers/recbole_sasrec.py`` trains SASRec (RecBole's defaults, ``loss_type: CE``, the batch size and
history length of the two-tower row, early stopping on its validation NDCG@10 with the same patience) and
returns its scores for every item, which are ranked here by the same code, seen items excluded. RecBole's own test
figures (seen items not excluded) are kept in the JSON beside the same ranking recomputed here without the
exclusion, a check that the two pipelines agree. Prints a table and writes ``bench/results/movielens.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import command_line, print_table, write_result
from bench.peer import PEER_PYTHON

DEFAULT_SOURCE = Path(".towerflow/sources/ml-100k")
SASREC_SCRIPT = Path(__file__).resolve().parent / "peers" / "recbole_sasrec.py"


def sasrec_row(events, ex, args: argparse.Namespace, batch_size: int) -> dict:
    """RecBole's SASRec on ``ex``'s split, ranked by towerflow's code.

    Returns {"row": table row, "ranks": (n,) holdout target ranks, seen excluded, **details for the JSON}.
    """
    from bench.peer import loo_sequences, run_peer
    from towerflow.tasks.evaluate import metrics_from_ranks, target_ranks

    seqs = loo_sequences(events, ex)
    threads = args.threads or 1
    print(f"SASRec (RecBole 1.2.1, own venv): {len(seqs.indptr) - 1} users, {len(seqs.items):,} actions, "
          f"up to {args.sasrec_epochs} epochs on {threads} thread(s)", flush=True)
    scores, result = run_peer(SASREC_SCRIPT, seqs, ex.vocab.n_items, [
        "--epochs", str(args.sasrec_epochs), "--patience", str(args.patience), "--seq-len", str(args.seq_len),
        "--batch-size", str(batch_size), "--threads", str(threads)])
    targets, n_items = ex.holdout.target_items, ex.vocab.n_items
    ranks = target_ranks(lambda rows: scores[rows], targets, n_items, ex.holdout_seen)
    unmasked = metrics_from_ranks(target_ranks(lambda rows: scores[rows], targets, n_items), ks=(10,))
    row = {"model": "SASRec (RecBole 1.2.1)", **metrics_from_ranks(ranks, ks=(10, 50)), "epochs": result["epochs"],
           "best_epoch": result["best_epoch"], "train_s": result["train_seconds"]}
    return {"row": row, "ranks": ranks, **result, "seen_not_excluded_recomputed_here": unmasked}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from towerflow.config import ExamplesConfig, ModelConfig, TrainConfig
    from towerflow.data.source import ParquetSource, SourceError
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.evaluate import baseline_ranks, metrics_from_ranks
    from towerflow.tasks.scoring import model_ranks
    from towerflow.tasks.train import train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="ML-100K in the contract's layout")
    p.add_argument("--seq-len", type=int, default=32, help="history actions per example (SASRec uses 50)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30, help="epoch cap (it stops early on validation, patience below)")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sasrec", action="store_true", help="also train RecBole's SASRec (needs: make peer-recbole)")
    p.add_argument("--sasrec-epochs", type=int, default=30, help="SASRec's epoch cap (it stops early on validation)")
    args = p.parse_args(argv)
    if args.sasrec and not PEER_PYTHON.exists():
        raise SystemExit(f"--sasrec needs the peer's own environment ({PEER_PYTHON}): make peer-recbole")

    try:
        src = ParquetSource(str(args.source))
        days = src.days()
    except SourceError as exc:
        raise SystemExit(f"{exc}\nfetch MovieLens-100K first: make data-ml100k") from exc
    from datetime import UTC, datetime, timedelta

    start = datetime(days[0].year, days[0].month, days[0].day, tzinfo=UTC)
    end = datetime(days[-1].year, days[-1].month, days[-1].day, tzinfo=UTC) + timedelta(days=1)
    t0 = time.perf_counter()
    events = src.read_events(start, end)
    ex = build_examples(events, src.read_users(), src.read_items(), end,
                        ExamplesConfig(split="leave_one_out", validation=True, max_holdout_users=None,
                                       max_seq_len=args.seq_len, seed=args.seed))
    build_s = time.perf_counter() - t0

    base = baseline_ranks(ex)
    rows = [{"model": name, **metrics_from_ranks(base[key], ks=(10, 50))}
            for name, key in (("popularity", "popularity"), ("co-occurrence", "cooccurrence"))]
    model_cfg = ModelConfig(n_layers=args.layers, d_model=args.d_model, dim=args.d_model, hidden=2 * args.d_model,
                            max_seq_len=max(args.seq_len, ModelConfig().max_seq_len))
    config = TrainConfig(model=model_cfg, epochs=args.epochs, patience=args.patience, seed=args.seed,
                         temperature=args.temperature, num_threads=args.threads)
    t0 = time.perf_counter()
    result = train(ex, config)
    train_s = time.perf_counter() - t0
    rows.append({"model": "two-tower (ours)", **metrics_from_ranks(
        model_ranks(result.model, ex.holdout, ex.user_feats, ex.holdout_seen), ks=(10, 50)),
        "epochs": len(result.history), "best_epoch": result.best_epoch, "train_s": round(train_s, 1)})

    peer = {}
    if args.sasrec:
        peer = sasrec_row(events, ex, args, batch_size=config.batch_size)
        rows.append(peer.pop("row"))
        peer.pop("ranks")

    print_table(rows, [("model", "model", ""), ("HR@10", "hr@10", ".4f"), ("NDCG@10", "ndcg@10", ".4f"),
                       ("HR@50", "hr@50", ".4f"), ("NDCG@50", "ndcg@50", ".4f"), ("epochs", "epochs", ""),
                       ("best", "best_epoch", ""), ("train s", "train_s", ".0f")],
                title=f"MovieLens-100K leave-one-out, full ranking over {ex.vocab.n_items:,} items, seen excluded; "
                      f"{len(ex.holdout):,} users, {len(ex.train):,} train examples; torch threads "
                      f"{config.num_threads or torch.get_num_threads()}")
    ours, base = rows[2], rows[:2]
    best_base = max(base, key=lambda r: r["hr@10"])
    print(f"\nours vs best baseline ({best_base['model']}): HR@10 x{ours['hr@10'] / best_base['hr@10']:.2f}, "
          f"NDCG@10 x{ours['ndcg@10'] / max(r['ndcg@10'] for r in base):.2f}; "
          f"{ours['epochs']} epochs in {train_s:.0f}s ({result.examples_per_s:,.0f} examples/s)")
    if args.sasrec:
        sas = rows[3]
        print(f"ours vs SASRec: HR@10 x{ours['hr@10'] / sas['hr@10']:.2f}, NDCG@10 x{ours['ndcg@10'] / sas['ndcg@10']:.2f}, "
              f"training time x{ours['train_s'] / sas['train_s']:.2f}")
    out = {"args": {**vars(args), "source": str(args.source)}, "n_items": ex.vocab.n_items,
           "n_users": len(ex.holdout), "n_train": len(ex.train), "build_seconds": round(build_s, 1),
           "train_seconds": round(train_s, 1), "torch_threads": config.num_threads or torch.get_num_threads(),
           "config": config.model_dump(mode="json"), "rows": rows, "sasrec": peer or None,
           "history": [{"epoch": e.epoch, "loss": e.loss, "valid": e.metrics, "seconds": e.seconds}
                       for e in result.history]}
    write_result("movielens", out, command_line("bench.movielens", argv))
    return out


if __name__ == "__main__":
    main()
