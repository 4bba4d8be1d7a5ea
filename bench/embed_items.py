"""Benchmark: item-tower throughput (items/s) of ``embed_items`` over a whole catalog, and its compute efficiency
against this machine's own dense matmul rate.

    python -m bench.embed_items [--items 1000000] [--batch-sizes 1024 8192 65536] [--threads 1 2]

The catalog is synthetic but shaped like the demo world's: 50 categories, 200 genres (up to 4 per item), 8 dense
features; the tower is the product's ``ItemTower`` with the default ``ModelConfig`` (d_model 64, hidden 128,
dim 64), in eval mode (weights do not change the cost). ``GFLOP/s`` counts the tower's Linear layers only (the
embedding look-ups move memory, they do no arithmetic); ``efficiency`` divides it by the fp32 matmul rate of
(1024, 1024) @ (1024, 1024) measured at the same thread count. Runs in a fresh process; prints a table and writes
``bench/results/embed_items.json``.
"""

from __future__ import annotations

import argparse
import time

from bench.common import command_line, matmul_gflops, peak_rss_mib, print_table, run_in_child, write_result


def _catalog(n: int, seed: int):
    """Feature table of n items (row 0 = padding) and its sizes."""
    import numpy as np
    import torch

    from towerflow.models.batch import FeatureSizes, ItemFeatures

    rng = np.random.default_rng(seed)
    genres = rng.integers(1, 201, (n + 1, 4))
    genres[rng.random((n + 1, 4)) < 0.4] = 0  # 0-4 genres per item
    feats = ItemFeatures(category=torch.from_numpy(rng.integers(1, 51, n + 1)),
                         genres=torch.from_numpy(genres),
                         dense=torch.from_numpy(rng.standard_normal((n + 1, 8), dtype=np.float32)))
    sizes = FeatureSizes(n_items=n, n_categories=50, n_genres=200, dense_dim=8, demographic_cardinalities=())
    return sizes, feats


def linear_flops_per_item(module) -> int:
    """Multiply-adds x 2 of every nn.Linear in ``module`` for one item."""
    from torch import nn

    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _run(n: int, batch_sizes: list[int], threads: list[int], seed: int) -> dict:
    import numpy as np
    import torch

    from towerflow.config import ModelConfig
    from towerflow.models.item_tower import ItemTower
    from towerflow.tasks.embed_items import embed_items

    sizes, feats = _catalog(n, seed)
    torch.manual_seed(seed)
    cfg = ModelConfig()
    tower = ItemTower(sizes, feats, cfg).eval()
    flops = linear_flops_per_item(tower)
    item_index, item_ids = np.arange(1, n + 1), np.arange(1, n + 1)
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        peak = matmul_gflops(1024)
        with torch.no_grad():
            tower(torch.arange(1, 2049))  # warm-up: allocator and kernel choice
        for b in batch_sizes:
            t0 = time.perf_counter()
            emb = embed_items(tower, item_index, item_ids, "bench", batch_size=b)
            seconds = time.perf_counter() - t0
            rate = n / seconds
            rows.append({"items": n, "threads": t, "batch_size": b, "seconds": round(seconds, 3),
                         "items_per_s": round(rate), "gflops": round(rate * flops / 1e9, 2),
                         "matmul_gflops": round(peak, 1), "efficiency": round(rate * flops / 1e9 / peak, 4)})
            print(f"  {t} thread(s), batch {b:,}: {rate:,.0f} items/s", flush=True)
            del emb
    return {"items": n, "model": cfg.model_dump(), "flops_per_item": flops, "rows": rows,
            "peak_rss_mib": round(peak_rss_mib(), 1)}


COLUMNS = [("items", "items", ","), ("threads", "threads", ""), ("batch", "batch_size", ","),
           ("seconds", "seconds", ".2f"), ("items/s", "items_per_s", ","), ("GFLOP/s", "gflops", ".1f"),
           ("matmul GFLOP/s", "matmul_gflops", ".1f"), ("efficiency", "efficiency", ".1%")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192, 65536])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    run = run_in_child(_run, n=args.items, batch_sizes=args.batch_sizes, threads=args.threads, seed=args.seed)
    print_table(run["rows"], COLUMNS, title=f"item tower over {args.items:,} items "
                                             f"({run['flops_per_item']:,} Linear FLOPs per item)")
    print(f"peak RSS {run['peak_rss_mib']:,.0f} MiB")
    write_result("embed_items", run, command_line("bench.embed_items", argv))
    return run


if __name__ == "__main__":
    main()
