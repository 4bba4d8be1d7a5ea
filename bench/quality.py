"""Benchmark: retrieval quality on the synthetic world (issue 3 targets), on a holdout large enough to read.

    python -m bench.quality [--seeds 0 1 2] [--users 10000] [--events-per-day 30000] [--days 7] [--stale-days 2]
                            [--threads N] [--result-name quality] [--oracle-only [--reference quality_defaults]]

For each seed a fresh world is generated, then (all with the default configs of towerflow/config.py):

- ``contextual``: the model trained on the whole window (last day held out, the day before it for early stopping);
- ``no-context``: the same model and data with ``use_context=False``;
- ``no-query``: the same model and data with ``use_query=False`` (no query in the context layer, no item text);
- ``popularity`` and ``co-occurrence``: the baselines of tasks/evaluate.py, fitted on the same train split (and,
  when the trained models refit, on the validation day's rows as they do);
- ``stale``: the contextual model trained on the window ending ``--stale-days`` days earlier, with the catalog of
  that time, scored on the same newest-day holdout (remapped to its vocabulary, as the flow scores the champion:
  items created since are misses);
- ``oracle``: the Bayes-optimal scorer under the world's own generator (bench/oracle.py: it reads each user's true
  interests, the items' weights and creation times, the query's topic), the ceiling no model can pass. It needs no
  training: ``--oracle-only`` builds the worlds and scores only it and the baselines (a minute, not 15), and with
  ``--reference NAME`` sets its search recall beside 3 x the no-query model's of ``bench/results/NAME.json`` (the same
  seeds give the same worlds and holdout; the row counts are checked).

Metrics are exact full-corpus Recall/NDCG@10 with seen items excluded, per surface, and on ``search`` by the target's
age at the request (at most ``FRESH_TARGET_DAYS`` old, when the world's fresh boost lifts it, or older); the holdout is each user's first
positive action on the last day. Seeds are pooled by concatenating their holdout rows (``pooled``); each seed is
reported too. Targets (issue 3): on ``related``, contextual Recall@10 >= 2 x no-context and >= 3 x popularity; the
fresh model beats the stale one on the newest day. Issue 18: on ``search``, contextual Recall@10 >= 3 x no-query and
>= 1.5 x the best of popularity and co-occurrence; ``related`` and ``homefeed`` no lower than no-query's by more than
one standard error (binomial, of the contextual model's recall). Prints tables and writes
``bench/results/quality.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta

import numpy as np

from bench.common import command_line, print_table, write_result

SLICES = ("all", "surface=homefeed", "surface=related", "surface=search", "search, target <= 2 days old",
          "search, older target")
FRESH_TARGET_DAYS = 2  # the world boosts an item's popularity up to 21x in its first days (synthetic.py FRESH_BOOST)
MODELS = ("contextual", "no-context", "no-query", "popularity", "co-occurrence", "stale", "oracle")
TRAINED = ("contextual", "no-context", "no-query", "stale")
REFIT = {"auto": "auto", "true": True, "false": False}  # --refit -> train.refit


def _examples(src, users, items, start: datetime, end: datetime):
    from towerflow.config import AugmentConfig, ExamplesConfig
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.refit import augment_examples

    ex = build_examples(src.read_events(start, end), users, items, end,
                        ExamplesConfig(validation=True, max_holdout_users=None))
    return augment_examples(ex, AugmentConfig())


def _train(ex, config, name: str) -> tuple[object, dict]:
    from towerflow.progress import say
    from towerflow.tasks.train import train

    say(f"training {name} on {len(ex.train):,} examples")
    t0 = time.perf_counter()
    result = train(ex, config)
    return result.model, {"seconds": round(time.perf_counter() - t0, 1), "epochs_run": len(result.history),
                          "best_epoch": result.best_epoch, "refit_epochs": result.refit_epochs,
                          "examples_per_s": round(result.examples_per_s)}


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """One world: every model's ranks on the newest-day holdout, and what it cost."""
    from bench.oracle import oracle_ranks
    from towerflow.config import TrainConfig, WorldConfig
    from towerflow.data.source import ParquetSource
    from towerflow.data.synthetic import generate_world
    from towerflow.tasks.evaluate import baseline_ranks
    from towerflow.tasks.refit import refit_wanted
    from towerflow.tasks.scoring import model_ranks, remap_examples

    world = WorldConfig(n_users=args.users, events_per_day=args.events_per_day, days=args.days, seed=seed)
    config = TrainConfig(num_threads=args.threads, refit=REFIT[args.refit])
    no_context = config.model_copy(update={"model": config.model.model_copy(update={"use_context": False})})
    no_query = config.model_copy(update={"model": config.model.model_copy(update={"use_query": False})})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="towerflow-quality-") as tmp:
        summary = generate_world(tmp, world)
        src = ParquetSource(tmp)
        users, items = src.read_users(), src.read_items()
        start = datetime(world.start.year, world.start.month, world.start.day, tzinfo=UTC)
        end = start + timedelta(days=world.days)
        fresh, aug = _examples(src, users, items, start, end)
        stale_end = end - timedelta(days=args.stale_days)
        # the catalog as it was then: items created since are unknown to the stale model, as in production
        stale_ex = None if args.oracle_only else _examples(src, users, items[items["created_ts"] < stale_end],
                                                           start, stale_end)[0]

    ranks, cost = {"oracle": oracle_ranks(fresh, world)}, {}
    # fitted on the rows the trained models learn from: with the refit, the validation day's too
    base = baseline_ranks(fresh, refit_rows=refit_wanted(config, fresh)[0])
    ranks["popularity"], ranks["co-occurrence"] = base["popularity"], base["cooccurrence"]
    common = {"seed": seed, "world": world.model_dump(mode="json"), "events": summary.events, "items": summary.items,
              "n_train": len(fresh.train), "n_valid": len(fresh.valid), "n_holdout": len(fresh.holdout),
              "surface": fresh.holdout.surface.tolist(), "target_age_days": _target_age_days(fresh, items).tolist()}
    if args.oracle_only:
        return {**common, "seconds": round(time.perf_counter() - t0, 1), "ranks": {k: v.tolist() for k, v in ranks.items()}}
    model, cost["contextual"] = _train(fresh, config, "contextual")
    ranks["contextual"] = model_ranks(model, fresh.holdout, fresh.user_feats, fresh.holdout_seen)
    model, cost["no-context"] = _train(fresh, no_context, "no-context")
    ranks["no-context"] = model_ranks(model, fresh.holdout, fresh.user_feats, fresh.holdout_seen)
    model, cost["no-query"] = _train(fresh, no_query, "no-query")
    ranks["no-query"] = model_ranks(model, fresh.holdout, fresh.user_feats, fresh.holdout_seen)
    model, cost["stale"] = _train(stale_ex, config, f"stale (window ending {args.stale_days} days earlier)")
    seq, seen = remap_examples(fresh.holdout, fresh.holdout_seen, fresh.vocab, stale_ex.vocab)
    ranks["stale"] = model_ranks(model, seq, stale_ex.user_feats, seen)
    new_items = int((fresh.holdout.target_items > 0).sum() - (seq.target_items > 0).sum())
    return {
        **common, "n_train_stale": len(stale_ex.train), "holdout_targets_unknown_to_stale": new_items,
        "pseudo_context_rate": round(aug.rate, 3), "pseudo_query_rows": aug.n_pseudo_query, "train": cost, "seconds": round(time.perf_counter() - t0, 1),
        "ranks": {k: v.tolist() for k, v in ranks.items()},
    }


def _target_age_days(ex, items) -> np.ndarray:
    """(n,) each holdout target's age in days at its request (from the items table's ``created_ts``)."""
    import pandas as pd

    created = pd.Series(pd.DatetimeIndex(items["created_ts"]).as_unit("s").asi8, index=items["item_id"].to_numpy())
    target_ids = ex.vocab.item_ids[ex.holdout.target_items - 1]
    return (ex.holdout.ts - created.loc[target_ids].to_numpy()) / 86_400


def _metrics(ranks: np.ndarray, surface: np.ndarray, age: np.ndarray) -> dict[str, dict[str, float]]:
    from towerflow.contract import SURFACES
    from towerflow.tasks.evaluate import metrics_from_ranks

    masks = {"all": np.ones(len(ranks), dtype=bool)}
    masks |= {f"surface={s}": surface == i for i, s in enumerate(SURFACES)}
    # what a model without the item's age misses: the world's fresh boost (issue 18's ceiling, README)
    search = surface == SURFACES.index("search")
    masks |= {SLICES[4]: search & (age <= FRESH_TARGET_DAYS), SLICES[5]: search & (age > FRESH_TARGET_DAYS)}
    return {k: metrics_from_ranks(ranks[m], ks=(10, 50)) for k, m in masks.items() if m.any()}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # None: the denominator scored nothing


def _stderr(recall: float, n: float) -> float:
    """Binomial standard error of a recall measured on n rows."""
    return float(np.sqrt(recall * (1 - recall) / n)) if n > 0 else 0.0


def search_targets(pooled: dict) -> tuple[dict, dict]:
    """Issue 18: the search slice's ratios and the related / homefeed no-regression check -> (ratios, targets)."""
    sr = {m: pooled[m]["surface=search"]["recall@10"] for m in pooled if "surface=search" in pooled[m]}
    best_base = max(sr.get("popularity", 0.0), sr.get("co-occurrence", 0.0))
    ratios = {"search_contextual_over_no_query": _ratio(sr.get("contextual", 0.0), sr.get("no-query", 0.0)),
              "search_contextual_over_best_baseline": _ratio(sr.get("contextual", 0.0), best_base)}
    targets = {
        "search_recall10_ge_3x_no_query": (ratios["search_contextual_over_no_query"] or 0) >= 3,
        "search_recall10_ge_1.5x_best_baseline": (ratios["search_contextual_over_best_baseline"] or 0) >= 1.5,
    }
    for s in ("related", "homefeed"):
        c, q = pooled["contextual"][f"surface={s}"], pooled["no-query"][f"surface={s}"]
        se = _stderr(c["recall@10"], c["n"])
        ratios[f"{s}_contextual_minus_no_query"] = c["recall@10"] - q["recall@10"]
        ratios[f"{s}_stderr"] = se
        targets[f"{s}_recall10_within_1se_of_no_query"] = c["recall@10"] >= q["recall@10"] - se
    return ratios, targets


def search_ceiling(oracle: dict[str, float], no_query_recall: float) -> dict[str, float | bool]:
    """Issue 18's 3x target against the world's Bayes ceiling: ``oracle`` is the oracle's search-slice metrics.

    The target is out of reach of any model when the oracle itself is below it or within one standard error.
    """
    target, se = 3 * no_query_recall, _stderr(oracle["recall@10"], oracle["n"])
    return {"oracle_recall10": oracle["recall@10"], "oracle_stderr": se, "target_3x_no_query": target,
            "oracle_minus_target": oracle["recall@10"] - target,
            "target_reachable": oracle["recall@10"] > target + se}


def summarize(runs: list[dict]) -> dict:
    """Per-seed and pooled metrics, the target ratios and whether each target is met (the models' targets only when
    the run trained them; ``--oracle-only`` has the oracle and the baselines)."""
    models = [m for m in MODELS if m in runs[0]["ranks"]]

    def table(sel: list[dict]) -> dict:
        surface = np.concatenate([np.asarray(r["surface"]) for r in sel])
        age = np.concatenate([np.asarray(r["target_age_days"]) for r in sel])
        return {m: _metrics(np.concatenate([np.asarray(r["ranks"][m]) for r in sel]), surface, age) for m in models}

    pooled = table(runs)
    if "contextual" not in pooled:
        return {"pooled": pooled}
    rel = {m: pooled[m]["surface=related"]["recall@10"] for m in models}
    ratios = {
        "related_contextual_over_no_context": _ratio(rel["contextual"], rel["no-context"]),
        "related_contextual_over_popularity": _ratio(rel["contextual"], rel["popularity"]),
        "all_fresh_minus_stale": pooled["contextual"]["all"]["recall@10"] - pooled["stale"]["all"]["recall@10"],
    }
    per_seed = [{"seed": r["seed"], **table([r])["contextual"]["surface=related"]} for r in runs]
    seed_ratios = []
    for r in runs:
        t = table([r])
        seed_ratios.append({
            "seed": r["seed"],
            "ctx_over_noctx": _ratio(t["contextual"]["surface=related"]["recall@10"],
                                     t["no-context"]["surface=related"]["recall@10"]),
            "ctx_over_pop": _ratio(t["contextual"]["surface=related"]["recall@10"],
                                   t["popularity"]["surface=related"]["recall@10"]),
            "fresh_minus_stale": t["contextual"]["all"]["recall@10"] - t["stale"]["all"]["recall@10"],
            "search_over_no_query": _ratio(t["contextual"]["surface=search"]["recall@10"],
                                           t["no-query"]["surface=search"]["recall@10"]),
        })
    targets = {
        "related_recall10_contextual_ge_2x_no_context": rel["contextual"] >= 2 * rel["no-context"],
        "related_recall10_contextual_ge_3x_popularity": rel["contextual"] >= 3 * rel["popularity"],
        "fresh_beats_stale_on_newest_day": ratios["all_fresh_minus_stale"] > 0,
    }
    search_ratios, search_checks = search_targets(pooled)
    ratios |= search_ratios
    targets |= search_checks
    ceiling = search_ceiling(pooled["oracle"]["surface=search"], pooled["no-query"]["surface=search"]["recall@10"])
    return {"pooled": pooled, "ratios": ratios, "per_seed_related": per_seed, "per_seed_ratios": seed_ratios,
            "targets": targets, "search_ceiling": ceiling}


def _reference_ceiling(name: str, oracle: dict) -> dict:
    """``search_ceiling`` against the no-query model of a committed result, which must hold the same holdout rows."""
    import json

    from bench.common import RESULTS_DIR

    ref = json.loads((RESULTS_DIR / f"{name}.json").read_text())["pooled"]
    counts = {s: ref["no-query"][s]["n"] for s in oracle if s in ref["no-query"]}  # older results: fewer slices
    if counts != {s: oracle[s]["n"] for s in counts}:
        raise SystemExit(f"--reference {name}: its holdout rows per slice {counts} are not this run's; "
                         "run it with the same seeds and world sizes")
    return {"reference": name, **search_ceiling(oracle["surface=search"], ref["no-query"]["surface=search"]["recall@10"])}


def _print_ceiling(c: dict, against: str) -> None:
    print(f"search ceiling: oracle R@10 {c['oracle_recall10']:.4f} (1 s.e. {c['oracle_stderr']:.4f}) vs 3 x {against} "
          f"{c['target_3x_no_query']:.4f}: {c['oracle_minus_target']:+.4f}; the 3x target is "
          f"{'within reach of a model' if c['target_reachable'] else 'NOT reachable by any model in this world'}")


def add_world_arguments(p: argparse.ArgumentParser) -> None:
    """The worlds this benchmark scores (bench/search_ceiling.py takes the same, so its rows are these)."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--events-per-day", type=int, default=30_000)
    p.add_argument("--days", type=int, default=7)


def main(argv: list[str] | None = None) -> dict:
    from towerflow.config import AugmentConfig, ExamplesConfig, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_world_arguments(p)
    p.add_argument("--stale-days", type=int, default=2, help="the stale model's window ends this many days earlier")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: the config's)")
    p.add_argument("--refit", choices=("auto", "true", "false"), default="auto",
                   help="train.refit of every trained model (auto: on, this world's split is time)")
    p.add_argument("--result-name", default="quality", help="writes bench/results/<name>.json (a partial run, e.g. "
                                                            "one seed, need not replace the full one)")
    p.add_argument("--oracle-only", action="store_true", help="no training: the worlds' Bayes-optimal oracle and "
                                                                "the baselines only")
    p.add_argument("--reference", default=None, help="with --oracle-only: the result (bench/results/<name>.json, "
                                                     "same seeds) whose no-query search recall the ceiling is set against")
    args = p.parse_args(argv)
    if args.days - args.stale_days < 3:
        p.error("--days minus --stale-days must leave at least 3 days (train, validation, holdout)")
    if args.reference and not args.oracle_only:
        p.error("--reference goes with --oracle-only (a full run has its own no-query model)")

    t0 = time.perf_counter()
    runs = [run_seed(s, args) for s in args.seeds]
    summary = summarize(runs)
    pooled = summary["pooled"]
    rows = [{"model": m, **{s: pooled[m][s]["recall@10"] for s in SLICES if s in pooled[m]},
             "ndcg": pooled[m]["all"]["ndcg@10"], "r50": pooled[m]["all"]["recall@50"]} for m in pooled]
    n = {s: int(pooled["oracle"][s]["n"]) for s in SLICES if s in pooled["oracle"]}
    print_table(rows, [("model", "model", "")] + [(f"R@10 {s.removeprefix('surface=')} (n={n[s]})", s, ".4f") for s in n]
                + [("NDCG@10 all", "ndcg", ".4f"), ("R@50 all", "r50", ".4f")],
                title=f"holdout = newest day, {len(runs)} world(s) pooled (seeds {args.seeds}); "
                      f"stale = window ending {args.stale_days} days earlier")
    wall = time.perf_counter() - t0
    if args.oracle_only:
        if args.reference:
            summary["search_ceiling"] = _reference_ceiling(args.reference, pooled["oracle"])
            _print_ceiling(summary["search_ceiling"], f"no-query of {args.reference}.json")
        result = {"args": vars(args), "wall_seconds": round(wall, 1), **summary,
                  "runs": [{k: v for k, v in run.items() if k not in ("ranks", "surface", "target_age_days")} for run in runs]}
        write_result(args.result_name, result, command_line("bench.quality", argv))
        return result
    print_table(summary["per_seed_ratios"], [("seed", "seed", ""), ("related ctx/no-ctx", "ctx_over_noctx", ".2f"),
                                             ("related ctx/pop", "ctx_over_pop", ".2f"),
                                             ("fresh - stale R@10", "fresh_minus_stale", "+.4f"),
                                             ("search ctx/no-query", "search_over_no_query", ".2f")], title="per seed")
    r = summary["ratios"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"\nrelated R@10: contextual / no-context = {fmt(r['related_contextual_over_no_context'])} (target >= 2), "
          f"contextual / popularity = {fmt(r['related_contextual_over_popularity'])} (target >= 3); "
          f"fresh - stale R@10 on the newest day = {r['all_fresh_minus_stale']:+.4f} (target > 0)")
    print(f"search R@10: contextual / no-query = {fmt(r['search_contextual_over_no_query'])} (target >= 3), "
          f"contextual / best of popularity and co-occurrence = {fmt(r['search_contextual_over_best_baseline'])} "
          f"(target >= 1.5); related {r['related_contextual_minus_no_query']:+.4f} (1 s.e. {r['related_stderr']:.4f}),"
          f" homefeed {r['homefeed_contextual_minus_no_query']:+.4f} (1 s.e. {r['homefeed_stderr']:.4f}) vs no-query")
    print(f"world per seed: {args.users:,} users, {runs[0]['items']:,} items, {runs[0]['events']:,} events over "
          f"{args.days} days; train {runs[0]['n_train']:,} examples; wall time {wall:.0f}s")
    for k, ok in summary["targets"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {k}")
    _print_ceiling(summary["search_ceiling"], "no-query")
    result = {
        "args": vars(args), "wall_seconds": round(wall, 1),
        "configs": {"examples": ExamplesConfig(validation=True, max_holdout_users=None).model_dump(mode="json"),
                    "augment": AugmentConfig().model_dump(mode="json"),
                    "train": TrainConfig(num_threads=args.threads, refit=REFIT[args.refit]).model_dump(mode="json")},
        **summary,
        "runs": [{k: v for k, v in run.items() if k not in ("ranks", "surface", "target_age_days")} for run in runs],
    }
    write_result(args.result_name, result, command_line("bench.quality", argv))
    return result


if __name__ == "__main__":
    main()
