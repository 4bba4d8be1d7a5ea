"""Train the two-tower model with DistributedDataParallel; run one copy per process under torchrun.

    torchrun --standalone --nproc_per_node 2 scripts/train_ddp.py --examples EXAMPLES_DIR --out OUT_DIR \
        [--config train.yaml] [--epochs N] [--batch-size B] [--device auto|cpu|cuda] [--checkpoint-dir DIR]

``EXAMPLES_DIR`` is a saved ``tasks.build_examples.Examples`` (what the retrain flow's build_examples stage keeps
under ``<data_root>/work/examples/<key>/examples``); ``--config`` a TrainConfig as YAML or JSON. CPU processes
use gloo, one process per GPU uses NCCL. Rank 0 writes the TrainResult (``model/`` + ``train.json``, loadable with
``TrainResult.load``) to ``OUT_DIR`` and prints a one-line JSON summary. Multi-node: replace ``--standalone`` with
``--nnodes N --node_rank I --rdzv_backend c10d --rdzv_endpoint HOST:PORT``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from towerflow.config import TrainConfig, read_config_data, validate_config
from towerflow.errors import TowerflowError
from towerflow.tasks.build_examples import Examples
from towerflow.tasks.distributed import env_from_torchrun, init_distributed, train_ddp


def load_train_config(path: str | None, epochs: int | None, batch_size: int | None) -> TrainConfig:
    """The file's TrainConfig (size, alias and strict-type limits of towerflow.config.load_config_file) with the
    command line's overrides; a problem is a ConfigError naming the file and key."""
    data = read_config_data(path) if path else {}
    overrides = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    return validate_config(TrainConfig, {**data, **overrides}, path or "(command line)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", required=True, help="directory of saved Examples")
    p.add_argument("--out", required=True, help="where rank 0 writes the TrainResult")
    p.add_argument("--config", help="TrainConfig as YAML or JSON")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="the global batch, split evenly over the processes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--checkpoint-dir", help="per-epoch checkpoint on storage every rank can read; resumes from it")
    args = p.parse_args(argv)

    env = env_from_torchrun()
    config = load_train_config(args.config, args.epochs, args.batch_size)
    device = init_distributed(env, args.device)
    try:
        examples = Examples.load(args.examples)
        result = train_ddp(examples, config, env, device, checkpoint_dir=args.checkpoint_dir)
        if env.is_main:
            result.save(args.out)
            last = result.history[-1] if result.history else None
            print(json.dumps({"out": args.out, "world_size": env.world_size, "device": str(device),
                              "best_epoch": result.best_epoch, "seconds": round(result.seconds, 2),
                              "examples_per_s": round(result.examples_per_s, 1),
                              "metrics": last.metrics if last else {}}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TowerflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
