"""A multi-seed yardstick for model changes on the public path's split (library calls, not the user's path).

    python -m bench.public_split --seeds 0 1 2 --set model.n_layers=2 --set train.temperature=0.05

``bench/public_path.py`` is the figure that counts (CLI and HTTP); it takes minutes per run and one run moves by
0.02-0.03 HR@10 from seed to seed, more than most settings do. This runs the same split through the library: each
user's last MovieLens-100K interaction withheld (``leave_last_out`` / ``last_after_ties``), the whole file imported
as a plain ``user,item,timestamp`` CSV, ``build_examples``' leave-one-out with validation (the withheld item is the
holdout, the user's last imported one validates), the default augmentation, ``train``, and HR@10 / NDCG@10 of the
withheld items with seen items excluded. The default config and each ``--set`` variant train once per seed; the
table shows the mean and the seeds' spread. A variant worth a public-path run beats the default on the mean by
more than the spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd

from bench.common import command_line, print_table, write_result
from bench.public_path import DEFAULT_DATA, last_after_ties, leave_last_out
from towerflow.config import AugmentConfig, ExamplesConfig, TrainConfig
from towerflow.data.interactions import import_interactions
from towerflow.data.source import ParquetSource
from towerflow.tasks.build_examples import Examples, build_examples
from towerflow.tasks.refit import augment_examples, refit_wanted
from towerflow.tasks.scoring import model_metrics
from towerflow.tasks.train import train


def split_examples(data: Path, work: Path, config: ExamplesConfig) -> Examples:
    """The public path's split of ML-100K (RecBole atomic ``ml-100k.inter`` under ``data``) as library examples."""
    df = pd.read_csv(data / "ml-100k.inter", sep="\t")
    df.columns = [c.split(":")[0] for c in df.columns]
    df = df.rename(columns={"user_id": "user", "item_id": "item"})[["user", "item", "timestamp"]]
    _, withheld = leave_last_out(df)
    last_after_ties(df, withheld).to_csv(work / "all.csv", index=False)
    import_interactions(str(work / "all.csv"), str(work / "source"))
    source = ParquetSource(str(work / "source"))
    days = source.days()
    start = pd.Timestamp(days[0], tz="UTC").to_pydatetime()
    end = pd.Timestamp(days[-1], tz="UTC").to_pydatetime() + timedelta(days=1)
    return build_examples(source.read_events(start, end), source.read_users(), source.read_items(), end, config)


def parse_set(text: str) -> tuple[str, object]:
    """``train.lr=0.001`` / ``model.n_layers=2`` -> (dotted key under TrainConfig, value parsed as JSON or text)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key = key.removeprefix("train.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def variant_config(sets: list[tuple[str, object]], seed: int, threads: int) -> TrainConfig:
    """TrainConfig defaults with ``sets`` applied (validated whole), the seed and the thread count."""
    data = TrainConfig().model_dump()
    data.update(seed=seed, num_threads=threads)
    for key, value in sets:
        *path, leaf = key.split(".")
        node = data
        for part in path:
            node = node[part]
        node[leaf] = value
    return TrainConfig.model_validate(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="RecBole ml-100k folder (make data-ml100k)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", type=parse_set, action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="a setting of the variant: TrainConfig (model.n_layers=2, train.lr=0.001) or ExamplesConfig "
                        "(examples.max_seq_len=50); repeat for several")
    p.add_argument("--variant-only", action="store_true", help="skip the default config (already measured)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--result-name", default="public_split")
    args = p.parse_args(argv)

    variants = ({} if args.variant_only and args.sets else {"default": []}) | ({"variant": args.sets} if args.sets else {})
    runs, rows = [], []
    for name, sets in variants.items():
        example_sets = {k.removeprefix("examples."): v for k, v in sets if k.startswith("examples.")}
        sets = [(k, v) for k, v in sets if not k.startswith("examples.")]
        config = ExamplesConfig(split="leave_one_out", max_holdout_users=None, **example_sets)
        if config.max_seq_len > TrainConfig().model.max_seq_len and not any(k == "model.max_seq_len" for k, _ in sets):
            sets.append(("model.max_seq_len", config.max_seq_len))
        with tempfile.TemporaryDirectory(prefix="towerflow-public-split-") as tmp:
            base = split_examples(args.data, Path(tmp), config)
        per_seed = []
        for seed in args.seeds:
            # the retrain's augmentation (new train and refit rows; base keeps the un-augmented ones)
            train_config = variant_config(sets, seed, args.threads)
            ex, _ = augment_examples(base, AugmentConfig(), refit=refit_wanted(train_config, base)[0])
            t0 = time.perf_counter()
            result = train(ex, train_config)
            m = model_metrics(result.model, ex.holdout, ex.user_feats, ex.holdout_seen, ks=(10,))
            per_seed.append({"seed": seed, "hr@10": m["recall@10"], "ndcg@10": m["ndcg@10"],
                             "best_epoch": result.best_epoch, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name} seed {seed}: withheld HR@10 {m['recall@10']:.4f} NDCG@10 {m['ndcg@10']:.4f} "
                  f"(best epoch {result.best_epoch})", flush=True)
        hr = [r["hr@10"] for r in per_seed]
        nd = [r["ndcg@10"] for r in per_seed]
        sets = [(f"examples.{k}", v) for k, v in example_sets.items()] + sets
        rows.append({"variant": name, "sets": " ".join(f"{k}={v}" for k, v in sets) or "-",
                     "hr": statistics.mean(hr), "hr_spread": max(hr) - min(hr), "ndcg": statistics.mean(nd),
                     "seconds": statistics.mean(r["seconds"] for r in per_seed)})
        runs.append({"variant": name, "sets": dict(sets), "per_seed": per_seed})
    print_table(rows, [("variant", "variant", ""), ("settings", "sets", ""), ("HR@10 mean", "hr", ".4f"),
                       ("HR@10 spread", "hr_spread", ".4f"), ("NDCG@10 mean", "ndcg", ".4f"),
                       ("train s", "seconds", ".0f")],
                title=f"public path's split, library level, seeds {args.seeds}")
    write_result(args.result_name, {"seeds": args.seeds, "rows": rows, "runs": runs},
                 command_line("bench.public_split", argv))


if __name__ == "__main__":
    main()
