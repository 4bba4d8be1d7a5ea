"""Benchmark: training throughput (examples/s) of the two-tower model against sequence length, batch size and
thread count, and its compute efficiency against this machine's own dense matmul rate.

    python -m bench.train_throughput [--lengths 8 16 32 64] [--batch-sizes 128 256 512 1024 2048] [--threads 1 2]

One training step is exactly what ``tasks.train.train`` does per batch: gather the batch from the examples, run both
towers, the in-batch softmax with logQ (``tasks.train.batch_loss``), backward, AdamW step. The examples come from a
synthetic world (2,000 users, 4 days x 20,000 events) built once with histories of the longest length and cut
to each length. The model is the default ``ModelConfig``; each point times the steps of about ``--seconds`` after
two warm-up steps and reports the median step (examples/s) and the best one (the rate when nothing else on the
machine waits, as for the matmul yardstick).

FLOPs per step are counted by ``torch.utils.flop_counter`` on one real step (every matmul of forward and
backward, i.e. the item tower over the batch's unique items, the encoder, the context layer and the b x b logits),
plus attention, which the counter does not see on CPU: 12 L^2 d_model per example per layer (QK^T and AV, forward
and the two-fold backward). ``efficiency`` = best-step GFLOP/s / the fp32 matmul rate of (n, n) @ (n, n) at n =
1024 measured in the same process with the same thread count (512 and 2048 are reported too). Each thread count
runs in a fresh process. Prints a table and writes ``bench/results/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import time

from bench.common import command_line, matmul_gflops, print_table, run_in_child, write_result

MATMUL_SIZES = (512, 1024, 2048)


def _examples(max_len: int, seed: int):
    """Train examples of a small synthetic world with histories of ``max_len``, and the world's config."""
    import tempfile
    from datetime import UTC, datetime, timedelta

    from towerflow.config import ExamplesConfig, WorldConfig
    from towerflow.data.source import ParquetSource
    from towerflow.data.synthetic import generate_world
    from towerflow.tasks.build_examples import build_examples

    world = WorldConfig(days=4, events_per_day=20_000, seed=seed)
    with tempfile.TemporaryDirectory(prefix="towerflow-bench-") as tmp:
        generate_world(tmp, world)
        src = ParquetSource(tmp)
        start = datetime(world.start.year, world.start.month, world.start.day, tzinfo=UTC)
        end = start + timedelta(days=world.days)
        ex = build_examples(src.read_events(start, end), src.read_users(), src.read_items(), end,
                            ExamplesConfig(max_seq_len=max_len))
    return ex, world


def _cut(seq, length: int):
    """The same examples with only the latest ``length`` history actions."""
    from dataclasses import replace

    return replace(seq, hist_items=seq.hist_items[:, -length:], hist_actions=seq.hist_actions[:, -length:],
                   hist_gaps=seq.hist_gaps[:, -length:])


def _step(model, opt, cfg, seq, user_feats, rng, batch_size: int) -> float:
    """One training step exactly as ``tasks.train.train`` takes it; returns its wall time in seconds."""
    from towerflow.tasks.train import batch_loss

    idx = rng.choice(len(seq), size=batch_size, replace=False)
    t0 = time.perf_counter()
    batch = seq.to_batch(idx, user_feats)
    u, v = model(batch)
    loss = batch_loss(model, u, v, batch.target_items, cfg, batch_size)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def _measure(threads: int, lengths: list[int], batch_sizes: list[int], default_len: int, default_batch: int,
             seconds: float, seed: int) -> dict:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from towerflow.config import ModelConfig, TrainConfig
    from towerflow.models.two_tower import TwoTower
    from towerflow.tasks.train import item_log_q

    torch.set_num_threads(threads)
    matmul = {str(n): round(matmul_gflops(n), 1) for n in MATMUL_SIZES}
    ex, world = _examples(max(lengths + [default_len]), seed)
    cfg = TrainConfig(model=ModelConfig(max_seq_len=max(64, *lengths, default_len)))
    rng = np.random.default_rng(seed)
    points = sorted({(L, default_batch) for L in lengths} | {(default_len, b) for b in batch_sizes})
    rows = []
    for length, batch_size in points:
        seq = _cut(ex.train, length)
        torch.manual_seed(seed)
        model = TwoTower(ex.sizes, ex.item_feats, cfg.model)
        model.set_log_q(item_log_q(ex, cfg))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

        args = (model, opt, cfg, seq, ex.user_feats, rng, batch_size)
        with FlopCounterMode(display=False) as counter:
            _step(*args)
        m = cfg.model
        attention = 12 * length**2 * m.d_model * m.n_layers * batch_size
        flops = counter.get_total_flops() + attention
        _step(*args)
        times, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            times.append(_step(*args))
        t, best = float(np.median(times)), min(times)
        # the best step, like the best matmul, is the rate when nothing else on the machine waits
        gflops = flops / best / 1e9
        rows.append({"threads": threads, "seq_len": length, "batch_size": batch_size, "steps": len(times),
                     "ms_per_step": round(1000 * t, 1), "examples_per_s": round(batch_size / t),
                     "best_examples_per_s": round(batch_size / best),
                     "mflop_per_example": round(flops / batch_size / 1e6, 2), "gflop_per_s": round(gflops, 2),
                     "efficiency": round(gflops / matmul["1024"], 3)})
    return {"threads": threads, "matmul_gflops": matmul, "rows": rows, "world": world.model_dump(mode="json"),
            "n_train_examples": len(ex.train), "model": cfg.model.model_dump(mode="json")}


def main(argv: list[str] | None = None) -> dict:
    from towerflow.config import ExamplesConfig, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per point")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    default_len, default_batch = ExamplesConfig().max_seq_len, TrainConfig().batch_size
    runs = [run_in_child(_measure, threads=t, lengths=args.lengths, batch_sizes=args.batch_sizes,
                         default_len=default_len, default_batch=default_batch, seconds=args.seconds, seed=args.seed)
            for t in args.threads]
    rows = [r for run in runs for r in run["rows"]]
    print_table(rows, [("threads", "threads", ""), ("L", "seq_len", ""), ("batch", "batch_size", ""),
                       ("median ms/step", "ms_per_step", ".1f"), ("examples/s", "examples_per_s", ",d"),
                       ("best examples/s", "best_examples_per_s", ",d"), ("MFLOP/ex", "mflop_per_example", ".2f"),
                       ("best GFLOP/s", "gflop_per_s", ".2f"), ("efficiency", "efficiency", ".1%")],
                title=f"training throughput (default L={default_len}, batch={default_batch}; "
                      f"{runs[0]['n_train_examples']:,} train examples)")
    print_table([{"threads": r["threads"], **{f"n{k}": v for k, v in r["matmul_gflops"].items()}} for r in runs],
                [("threads", "threads", "")] + [(f"matmul {n} GFLOP/s", f"n{n}", ".1f") for n in MATMUL_SIZES],
                title="dense fp32 matmul rate, same processes")
    result = {"default_seq_len": default_len, "default_batch_size": default_batch, "runs": runs}
    write_result("train_throughput", result, command_line("bench.train_throughput", argv))
    return result


if __name__ == "__main__":
    main()
