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

    python -m bench.train_throughput --compare REV [--rounds 6] [--seconds 3] [--epochs 3]

Another revision's training step against the working tree's, in one run (the machine may be shared, so only ratios
measured side by side mean anything): ``git archive REV`` laid out as the installed package, imported by one
spawned child, the working tree by another; the two take turns (``--rounds`` x ``--seconds`` each, the order
alternating) at the default history length and batch on 1 thread, on the same examples and batches. Reported per
side: median and best step, thread CPU per step, examples/s; the speed-up as the ratio of the medians, of the best
steps, of CPU time, and the median of the rounds' ratios. Then each code trains 3 epochs (``tasks.train.train``)
at seed 0, and the working tree again at seed 1 (the size of seed-to-seed noise): per-epoch loss and recall@10
side by side. Writes ``bench/results/train_throughput_compare.json``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

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


def _step(model, opt, sched, cfg, seq, user_feats, rng, batch_size: int, average=None) -> float:
    """One training step exactly as ``tasks.train.run_epoch`` takes it (the weight average's update included, when
    the code has one); returns its wall time in seconds."""
    from towerflow.tasks.train import batch_loss, train_step

    idx = rng.choice(len(seq), size=batch_size, replace=False)
    t0 = time.perf_counter()
    batch = seq.to_batch(idx, user_feats)
    u, v = model(batch)
    train_step(batch_loss(model, u, v, batch.target_items, cfg, batch_size), opt, sched, "bench")
    if average is not None:
        average.update()
    return time.perf_counter() - t0


def _setup(ex, cfg, seed: int, steps: int):
    """A fresh model (seeded), its optimizer and schedule, and its weight average (None in code before
    ``tasks.train.averaging_epochs``, a --compare revision, or when ``cfg.average_epochs`` resolves to 0 for the
    examples' split), as ``tasks.train`` builds them -> (model, opt, sched, average)."""
    import torch

    import towerflow.tasks.train as train
    from towerflow.models.two_tower import TwoTower

    torch.manual_seed(seed)
    model = TwoTower(ex.sizes, ex.item_feats, cfg.model)
    model.set_log_q(train.item_log_q(ex, cfg))
    model.train()
    opt, sched = train.make_optimizer(model, cfg, steps)
    # as run_average resolves it; None in a --compare revision from before averaging_epochs
    average = (train.weight_average(model, train.averaging_epochs(cfg, ex.meta.get("split"))[0], steps, None)
               if hasattr(train, "averaging_epochs") else None)
    return model, opt, sched, average


def _measure(threads: int, lengths: list[int], batch_sizes: list[int], default_len: int, default_batch: int,
             seconds: float, seed: int) -> dict:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from towerflow.config import ModelConfig, TrainConfig

    torch.set_num_threads(threads)
    matmul = {str(n): round(matmul_gflops(n), 1) for n in MATMUL_SIZES}
    ex, world = _examples(max(lengths + [default_len]), seed)
    cfg = TrainConfig(model=ModelConfig(max_seq_len=max(64, *lengths, default_len)))
    rng = np.random.default_rng(seed)
    points = sorted({(L, default_batch) for L in lengths} | {(default_len, b) for b in batch_sizes})
    rows = []
    for length, batch_size in points:
        seq = _cut(ex.train, length)
        model, opt, sched, average = _setup(ex, cfg, seed, len(seq) // batch_size)
        args = (model, opt, sched, cfg, seq, ex.user_feats, rng, batch_size, average)
        with FlopCounterMode(display=False) as counter:
            _step(*args)
        m = cfg.model
        # fused attention kernels are invisible to the counter on CPU; attention written as bmm is counted already
        seen = counter.get_flop_counts().get("Global", {})
        counted = any(op in seen for op in (torch.ops.aten.bmm, torch.ops.aten.baddbmm))
        attention = 0 if counted else 12 * length**2 * m.d_model * m.n_layers * batch_size
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


SUBPACKAGES = ("models", "tasks", "validation", "infra", "flows", "serving")
_CHILD: dict = {}  # in a compare child: its examples, model and optimizer, kept between rounds


def _export(rev: str, dest: Path) -> str:
    """The towerflow package as of git revision ``rev``, laid out as installed (towerflow/models, ...) under
    ``dest``; -> the folder to put first on ``sys.path``."""
    root = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "archive", rev, "towerflow", *SUBPACKAGES], cwd=root, capture_output=True,
                         check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    for sub in SUBPACKAGES:
        (dest / sub).rename(dest / "towerflow" / sub)
    return str(dest)


def _child_init(code: str | None) -> None:
    """Spawned compare child: import towerflow from ``code`` (an exported revision) instead of the working tree."""
    if code:
        sys.path.insert(0, code)


def _child_examples(length: int, seed: int):
    if ("examples", length, seed) not in _CHILD:
        _CHILD["examples", length, seed] = _examples(length, seed)[0]
    return _CHILD["examples", length, seed]


def _compare_chunk(length: int, batch_size: int, seconds: float, seed: int) -> dict:
    """Training steps for about ``seconds`` on 1 thread with this child's code -> wall and thread-CPU seconds each."""
    import numpy as np
    import torch

    import towerflow.models.two_tower as two_tower
    from towerflow.config import ModelConfig, TrainConfig

    torch.set_num_threads(1)
    key = ("model", length, batch_size, seed)
    if key not in _CHILD:
        ex = _child_examples(length, seed)
        cfg = TrainConfig(model=ModelConfig(max_seq_len=max(64, length)))
        model, opt, sched, average = _setup(ex, cfg, seed, len(ex.train) // batch_size)
        args = (model, opt, sched, cfg, ex.train, ex.user_feats, np.random.default_rng(seed), batch_size, average)
        _step(*args)
        _step(*args)  # warm-up
        _CHILD[key] = args
    args = _CHILD[key]
    wall, cpu, deadline = [], [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(wall) < 3:
        c0 = time.thread_time()
        wall.append(_step(*args))
        cpu.append(time.thread_time() - c0)
    return {"wall": wall, "cpu": cpu, "code": two_tower.__file__}


def _compare_curve(length: int, epochs: int, seed: int) -> dict:
    """``tasks.train.train`` for ``epochs`` epochs at ``seed`` -> per-epoch loss and recall@10."""
    from towerflow.config import ModelConfig, TrainConfig
    from towerflow.tasks.train import train

    ex = _child_examples(length, 0)
    result = train(ex, TrainConfig(epochs=epochs, seed=seed, model=ModelConfig(max_seq_len=max(64, length))))
    return {"loss": [e.loss for e in result.history],
            "recall@10": [e.metrics.get("recall@10") for e in result.history]}


def compare(rev: str, length: int, batch_size: int, rounds: int, seconds: float, epochs: int) -> dict:
    """Revision ``rev`` against the working tree in one run: two spawned children (one per code), taking turns
    for ``rounds`` x ``seconds`` each at the default model on 1 thread, then the same seed's loss curve from each
    (and the working tree's at a second seed, the size of seed-to-seed noise)."""
    import multiprocessing as mp

    import numpy as np

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="towerflow-compare-") as tmp:
        code = _export(rev, Path(tmp))
        with ctx.Pool(1, _child_init, (code,)) as old, ctx.Pool(1, _child_init, (None,)) as new:
            pools = {"old": old, "new": new}
            runs: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "ratio": []} for k in pools}
            where = {}
            for r in range(rounds):
                order = ["old", "new"] if r % 2 == 0 else ["new", "old"]  # neither always goes first
                got = {}
                for name in order:
                    got[name] = pools[name].apply(_compare_chunk, (length, batch_size, seconds, 0))
                    runs[name]["wall"] += got[name]["wall"]
                    runs[name]["cpu"] += got[name]["cpu"]
                    where[name] = got[name]["code"]
                runs["new"]["ratio"].append(float(np.median(got["old"]["wall"]) / np.median(got["new"]["wall"])))
            curves = {"old seed 0": old.apply(_compare_curve, (length, epochs, 0)),
                      "new seed 0": new.apply(_compare_curve, (length, epochs, 0)),
                      "new seed 1": new.apply(_compare_curve, (length, epochs, 1))}
    sides = {}
    for name, t in runs.items():
        wall, cpu = np.array(t["wall"]), np.array(t["cpu"])
        sides[name] = {"steps": len(wall), "ms_per_step": round(1000 * float(np.median(wall)), 2),
                       "best_ms": round(1000 * float(wall.min()), 2),
                       "cpu_ms_per_step": round(1000 * float(np.median(cpu)), 2),
                       "examples_per_s": round(batch_size / float(np.median(wall))),
                       "best_examples_per_s": round(batch_size / float(wall.min())), "code": where[name]}
    o, n = sides["old"], sides["new"]
    ratios = {"median": round(o["ms_per_step"] / n["ms_per_step"], 3),
              "best": round(o["best_ms"] / n["best_ms"], 3),
              "cpu": round(o["cpu_ms_per_step"] / n["cpu_ms_per_step"], 3),
              "per_round": [round(x, 3) for x in runs["new"]["ratio"]],
              "per_round_median": round(float(np.median(runs["new"]["ratio"])), 3)}
    return {"rev": rev, "seq_len": length, "batch_size": batch_size, "rounds": rounds, "seconds": seconds,
            "sides": sides, "speedup": ratios, "curves": curves}


def _print_compare(c: dict) -> None:
    rows = [{"side": f"{k} ({c['rev'] if k == 'old' else 'working tree'})", **v} for k, v in c["sides"].items()]
    print_table(rows, [("code", "side", ""), ("steps", "steps", ""), ("median ms/step", "ms_per_step", ".2f"),
                       ("best ms", "best_ms", ".2f"), ("CPU ms/step", "cpu_ms_per_step", ".2f"),
                       ("examples/s", "examples_per_s", ",d"), ("best examples/s", "best_examples_per_s", ",d")],
                title=f"training step, L={c['seq_len']}, batch={c['batch_size']}, 1 thread, "
                      f"{c['rounds']} alternating rounds of {c['seconds']:g} s")
    s = c["speedup"]
    print(f"speed-up new/old: median step x{s['median']}, best step x{s['best']}, CPU per step x{s['cpu']}, "
          f"median of the rounds' ratios x{s['per_round_median']}; per round {s['per_round']}")
    names = list(c["curves"])
    rows = [{"epoch": e + 1, **{f"{n} {m}": c["curves"][n][m][e] for n in names for m in ("loss", "recall@10")}}
            for e in range(len(c["curves"][names[0]]["loss"]))]
    print_table(rows, [("epoch", "epoch", "")] + [(f"{n} {m}", f"{n} {m}", ".4f") for n in names
                                                  for m in ("loss", "recall@10")],
                title="the same training (tasks.train.train) per epoch: loss and early-stopping recall@10")


def main(argv: list[str] | None = None) -> dict:
    from towerflow.config import ExamplesConfig, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", metavar="REV", help="only compare git revision REV with the working tree, "
                   "alternating, at the default model on 1 thread (writes train_throughput_compare.json)")
    p.add_argument("--rounds", type=int, default=6, help="--compare: alternating rounds of --seconds per side")
    p.add_argument("--epochs", type=int, default=3, help="--compare: epochs of the loss curves")
    args = p.parse_args(argv)
    default_len, default_batch = ExamplesConfig().max_seq_len, TrainConfig().batch_size
    if args.compare:
        result = compare(args.compare, default_len, default_batch, args.rounds, args.seconds, args.epochs)
        _print_compare(result)
        write_result("train_throughput_compare", result, command_line("bench.train_throughput", argv))
        return result
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
