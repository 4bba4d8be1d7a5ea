"""Benchmark: the ranking stage (issue 17) on held-out request slates of the synthetic world.

A world with slates (``WorldConfig.slate_size``: each request shows several items, grouped by ``request_id``) is
split by time: the last day's requests are the holdout, the days before train. Compared on the holdout:

- ``transact``: TransAct + DCN v2 (models/ranker.py), the user's last S actions before each request;
- ``no_sequence``: the same DCN v2 without the sequence (same features otherwise, same training);
- ``profile_dot``: the retrieval-score stand-in, the user's profile vector dot the item vector (no release is
  trained here, so no retriever's embeddings: see "item vectors" below);
- ``popularity``: positive engagements of the item in the training days.

Features of both rankers: the candidate's item vector (frozen; no learned item-id embedding: it overfit), the surface, a
daily user profile (the mean item vector of the user's positives before the request's day: knows the user's
interests, not the current session) and its dot with the candidate (``profile_dot``'s score, as a ranker takes the
retriever's score). Item vectors: the items' content (category one-hot + the world's dense
features, standardized) stand in for a release's item embeddings, so the benchmark needs no retriever.

Metrics (tasks/evaluate_ranker.py): per-head AUC, GAUC, and HIT@3 of each head, requests ranked by the blended
score. Cost: ranking 200 candidates for one user on one torch thread, in process, at S = 100 and S = 32.

    python -m bench.ranking --seeds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import command_line, print_table, write_result
from towerflow.config import RANKER_HEADS, RankerConfig, RankerStageConfig, RankerTrainConfig, WorldConfig
from towerflow.contract import NEGATIVE_ACTIONS, POSITIVE_ACTIONS

DAY_US = 86_400_000_000
METHODS = ("transact", "no_sequence", "profile_dot", "popularity")


def item_vectors(items: pd.DataFrame, item_ids: np.ndarray, genres: bool = False) -> np.ndarray:
    """(n_items + 1, D) content vectors of the vocabulary's items (row 0 = padding): category one-hot (with
    ``genres``: genre multi-hot) + dense features standardized."""
    rows = items.set_index("item_id").loc[item_ids]
    cats = rows["category"].to_numpy(dtype=str)
    onehot = (cats[:, None] == np.unique(cats)[None, :]).astype(np.float32)
    if genres:
        onehot = rows["genres"].fillna("").str.get_dummies(sep="|").to_numpy(dtype=np.float32)
    parts = [onehot]
    if "features" in rows.columns:
        f = np.stack(rows["features"].to_numpy()).astype(np.float32)
        parts.append((f - f.mean(0)) / np.maximum(f.std(0), 1e-6))
    table = np.hstack(parts)
    return np.vstack([np.zeros((1, table.shape[1]), np.float32), table])


def event_us(events: pd.DataFrame) -> np.ndarray:
    """(n,) event times as epoch microseconds, whatever unit the column is stored in."""
    return pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8


def request_features(events: pd.DataFrame, vocab, table: np.ndarray, ex) -> np.ndarray:
    """(n, D + 1) dense features of each row: the user's daily profile (mean vector of their positives before the
    request's day) and its dot with the candidate's vector (the retrieval-score stand-in, as rankers take the
    retriever's score as a feature)."""
    from towerflow.tasks.ranking_examples import user_profiles

    profile = user_profiles(events, vocab, table, ex.user_id, ex.ts_us - ex.ts_us % DAY_US)
    return np.hstack([profile, np.einsum("nd,nd->n", profile, table[ex.item])[:, None]]).astype(np.float32)


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """Generate one world, train both rankers, score every method on the holdout day -> per-method metrics."""
    from towerflow.data.synthetic import generate_world
    from towerflow.tasks.evaluate_ranker import evaluate_ranking
    from towerflow.tasks.ranking_examples import build_ranking_examples
    from towerflow.tasks.train_ranker import evaluate_ranker, train_ranker
    from towerflow.tasks.vocabulary import build_vocab

    world = WorldConfig(n_users=args.users, n_items=args.items, days=args.days, events_per_day=args.requests_per_day,
                        slate_size=args.slate, seed=seed)
    with tempfile.TemporaryDirectory(prefix="bench-ranking-") as d:
        generate_world(d, world)
        events = pd.read_parquet(Path(d) / "events")
        users, items = pd.read_parquet(Path(d) / "users.parquet"), pd.read_parquet(Path(d) / "items.parquet")
    vocab = build_vocab(users, items)
    table = item_vectors(items, vocab.item_ids)
    cut = int(pd.Timestamp(world.start, tz="UTC").value // 1000) + (args.days - 1) * DAY_US
    train = build_ranking_examples(events, vocab, args.seq_len, end_us=cut)
    holdout = build_ranking_examples(events, vocab, args.seq_len, start_us=cut)
    dense_train, dense_holdout = (request_features(events, vocab, table, ex) for ex in (train, holdout))
    out: dict = {"seed": seed, "train_rows": len(train), "holdout_rows": len(holdout),
                 "holdout_requests": holdout.n_requests, "methods": {}, "train_seconds": {}}
    for name, use_sequence in (("transact", True), ("no_sequence", False)):
        cfg = RankerTrainConfig(model=RankerConfig(max_seq_len=args.seq_len, use_sequence=use_sequence,
                                                   cross_rank=args.cross_rank,
                                                   time_window_prob=args.window_prob),
                                epochs=args.epochs, patience=2, seed=seed, num_threads=args.threads)
        t0 = time.perf_counter()
        result = train_ranker(train, table, cfg, dense_train)
        out["train_seconds"][name] = round(time.perf_counter() - t0, 1)
        out["methods"][name] = evaluate_ranker(result.model, holdout, dense_holdout) | {"epochs": result.best_epoch}
    positive = np.isin(events["action"].to_numpy(dtype=str), POSITIVE_ACTIONS)
    before = event_us(events) < cut
    counts = np.bincount(vocab.item_index(events["item_id"].to_numpy()[positive & before]),
                         minlength=len(table)).astype(np.float64)
    for name, score in (("profile_dot", dense_holdout[:, -1]),
                        ("popularity", counts[holdout.item])):
        out["methods"][name] = evaluate_ranking(holdout.labels, holdout.request, holdout.user_id, score)
    return out


LATENCY_CASES = (  # (label, S, RankerConfig overrides): the default widths, and narrower tokens (d_model 20, not 40)
    ("default", 100, {}), ("default", 32, {}), ("narrow", 100, {"action_dim": 4, "item_dim": 8}),
    ("narrow", 32, {"action_dim": 4, "item_dim": 8}))


def auc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil, 1982)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return float(np.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)))


def run_movielens(path: str, args: argparse.Namespace) -> dict:
    """MovieLens ratings, time split (the last 10% of ratings by time held out): each (user, second) is a request
    of the movies rated in it (no slates: HIT@3 means little), AUC of 4-5 stars against 1-2 stars (3 left out) of the
    blended score, TransAct vs the same ranker without the sequence, with Hanley-McNeil standard errors."""
    import torch

    from towerflow.models.ranker import blended_score
    from towerflow.tasks.evaluate_ranker import auc
    from towerflow.tasks.ranking_examples import build_ranking_examples
    from towerflow.tasks.train_ranker import predict, train_ranker
    from towerflow.tasks.vocabulary import build_vocab

    events = pd.read_parquet(Path(path) / "events")
    users, items = pd.read_parquet(Path(path) / "users.parquet"), pd.read_parquet(Path(path) / "items.parquet")
    vocab = build_vocab(users, items)
    table = item_vectors(items, vocab.item_ids, genres=True)
    cut = int(np.quantile(event_us(events), 0.9))
    train = build_ranking_examples(events, vocab, args.seq_len, end_us=cut)
    holdout = build_ranking_examples(events, vocab, args.seq_len, start_us=cut)
    dense_train, dense_holdout = (request_features(events, vocab, table, ex) for ex in (train, holdout))
    heads = {h: i for i, h in enumerate(RANKER_HEADS)}
    good = holdout.labels[:, [heads["save"], heads["conversion"]]].max(axis=1)
    bad = holdout.labels[:, [heads["skip"], heads["hide"]]].max(axis=1)
    keep = (good + bad) > 0
    out: dict = {"path": path, "train_rows": len(train), "holdout_rows": len(holdout), "scored_rows": int(keep.sum()),
                 "positives": int(good[keep].sum()), "negatives": int(bad[keep].sum()), "methods": {}}
    for name, use_sequence in (("transact", True), ("no_sequence", False)):
        cfg = RankerTrainConfig(model=RankerConfig(max_seq_len=args.seq_len, use_sequence=use_sequence,
                                                   cross_rank=args.cross_rank, time_window_prob=args.window_prob),
                                epochs=args.ml_epochs, patience=2, seed=0, num_threads=args.threads)
        result = train_ranker(train, table, cfg, dense_train)
        score = blended_score(torch.from_numpy(predict(result.model, holdout, dense_holdout)),
                              cfg.model.score_weights).numpy()
        a = auc(good[keep], score[keep])
        out["methods"][name] = {"auc": a, "se": auc_se(a, out["positives"], out["negatives"]),
                                "epochs": result.best_epoch}
    t, b = out["methods"]["transact"], out["methods"]["no_sequence"]
    out["auc_gain"] = t["auc"] - b["auc"]
    out["gain_in_se"] = out["auc_gain"] / float(np.hypot(t["se"], b["se"]))
    return out


def latency(candidates: int, reps: int, n_items: int = 3000) -> list[dict]:
    """Ranking ``candidates`` items for one user (a full sequence of S actions), one torch thread, in process:
    wall and thread-CPU percentiles per ``LATENCY_CASES`` and path, the two paths alternating call by call so they
    share the machine's load: ``shared`` is ``score_candidates`` (the sequence's work done once,
    ``TransAct.forward_shared``), ``batch`` the same model over the sequence repeated per candidate (what
    ``score_candidates`` ran before, and what training and evaluation run)."""
    import torch

    from towerflow.models.ranker import Ranker, RankerBatch, score_candidates
    from towerflow.tasks.train import torch_threads

    rows = []
    rng = np.random.default_rng(0)
    table = torch.as_tensor(rng.normal(size=(n_items + 1, 28)).astype(np.float32))
    with torch_threads(1):
        for label, s, overrides in LATENCY_CASES:
            cfg = RankerConfig(max_seq_len=s, cross_rank=32, **overrides)  # as the quality runs
            model = Ranker(table, cfg, dense_dim=28).eval()
            cand = rng.integers(1, n_items + 1, candidates)
            hist_items, hist_actions = rng.integers(1, n_items + 1, s), rng.integers(1, 7, s)
            age, dense = np.sort(rng.random(s) * 1e5)[::-1].astype(np.float32), rng.normal(size=28).astype(np.float32)
            c = len(cand)
            repeated = RankerBatch(torch.as_tensor(cand), torch.zeros(c, dtype=torch.int64),
                                   torch.as_tensor(hist_items)[None].expand(c, -1),
                                   torch.as_tensor(hist_actions)[None].expand(c, -1),
                                   torch.as_tensor(age)[None].expand(c, -1), torch.as_tensor(dense)[None].expand(c, -1))

            paths = {"shared": partial(score_candidates, model, cand, 0, hist_items, hist_actions, age, dense),
                     "batch": partial(torch.no_grad()(model), repeated)}
            wall: dict[str, list[float]] = {p: [] for p in paths}
            cpu: dict[str, list[float]] = {p: [] for p in paths}
            for i in range(reps + 20):
                for p, call in paths.items():
                    t0, c0 = time.perf_counter(), time.thread_time()
                    call()
                    if i >= 20:  # warm-up: first calls allocate
                        wall[p].append(time.perf_counter() - t0)
                        cpu[p].append(time.thread_time() - c0)
            for p in paths:
                rows.append({"widths": label, "d_model": cfg.action_dim + 2 * cfg.item_dim, "seq_len": s,
                             "candidates": candidates, "path": p,
                             "p50_ms": 1e3 * float(np.percentile(wall[p], 50)),
                             "p99_ms": 1e3 * float(np.percentile(wall[p], 99)),
                             "cpu_p50_ms": 1e3 * float(np.percentile(cpu[p], 50)),
                             "cpu_p99_ms": 1e3 * float(np.percentile(cpu[p], 99))})
            rows[-2]["cpu_p50_speedup_vs_batch"] = rows[-1]["cpu_p50_ms"] / rows[-2]["cpu_p50_ms"]
    return rows


def two_stage_http(args: argparse.Namespace) -> dict:
    """``/recommend`` (200 candidates ranked) beside ``/retrieve`` over HTTP, one run: a slate world, the real retrain
    flow with its ranking stage at S = ``args.seq_len`` (a few epochs' worth of quality is not the point), ``towerflow
    serve`` in a subprocess (1 torch thread), one client on a keep-alive connection alternating the two endpoints
    request by request for the same users, so both share the machine's load. Client-side p50/p99 per endpoint."""
    import asyncio

    from bench.common import bench_data_root
    from bench.serving import Server, _Connection, _retrain_config
    from towerflow.config import RankerGateConfig
    from towerflow.data.synthetic import generate_world
    from towerflow.flows.retrain import retrain

    world = WorldConfig(n_users=args.users, n_items=args.items, days=args.days, events_per_day=args.requests_per_day,
                        slate_size=args.slate, seed=0)
    with bench_data_root(None, "towerflow-bench-two-stage-") as root:
        generate_world(str(root / "source"), world)
        events = pd.read_parquet(root / "source" / "events")
        as_of = world.start + pd.Timedelta(days=world.days).to_pytimedelta()
        stage = RankerStageConfig(train=RankerTrainConfig(
            model=RankerConfig(max_seq_len=args.seq_len, cross_rank=args.cross_rank), epochs=1),
            max_train_requests=args.http_train_requests,
            gate=RankerGateConfig(min_lift_over_baselines=-1.0, max_regression=1.0))  # this measures serving cost
        cfg = _retrain_config(True, 0, promote=True).model_copy(update={"ranker": stage})
        t0 = time.perf_counter()
        result = retrain(as_of=as_of, lookback_days=world.days, config=cfg)
        setup_s = time.perf_counter() - t0
        if result.status != "promoted":
            raise RuntimeError(f"the retrain did not promote a release: {result.status}")
        fit_s = _cooccurrence_fit_seconds()
        acted = events[~events["action"].isin(["impression"])].groupby("user_id").size().sort_values(ascending=False)
        users = acted.index.to_numpy()[: args.http_users]
        server = Server(root, "hybrid")
        try:
            server.wait_ready()
            host, port = server.url.rsplit("//", 1)[1].split(":")

            sources: dict[str, int] = {}

            async def run() -> dict[str, list[float]]:
                conn = _Connection(host, int(port))
                lat: dict[str, list[float]] = {"/retrieve": [], "/recommend": []}
                bodies = {"/retrieve": {"k": 10}, "/recommend": {"k": 10, "candidates": 200}}
                try:
                    for rep in range(2):  # the first pass warms up (allocations, caches); the second is measured
                        for u in users.tolist():
                            for path, extra in bodies.items():
                                t0 = time.perf_counter()
                                status, raw = await conn.post(path, json.dumps({"user_id": int(u), **extra}).encode())
                                if status != 200:
                                    raise RuntimeError(f"{path} answered {status}: {raw[:300]!r}")
                                if rep:
                                    lat[path].append(time.perf_counter() - t0)
                                    for it in json.loads(raw)["items"] if path == "/recommend" else []:
                                        key = "+".join(sorted(it["sources"]))
                                        sources[key] = sources.get(key, 0) + 1
                finally:
                    await conn.close()
                return lat

            lat = asyncio.run(run())
        finally:
            server.stop()
    rows = [{"endpoint": path, "requests": len(v), "p50_ms": 1e3 * float(np.percentile(v, 50)),
             "p99_ms": 1e3 * float(np.percentile(v, 99))} for path, v in lat.items()]
    fill = np.minimum(acted.to_numpy()[: args.http_users], args.seq_len)
    return {"rows": rows, "release": result.release_id, "setup_s": round(setup_s, 1), "seq_len": args.seq_len,
            "recommended_items_by_generators": sources, "cooccurrence_fit_s": fit_s,
            "sequence_fill_mean": float(fill.mean()), "sequence_full_share": float((fill == args.seq_len).mean()),
            "world": world.model_dump(mode="json")}


def _ndcg(answer: list[int], relevant: set[int], k: int = 10) -> float:
    """Binary-gain NDCG@k of one answer against the request's engaged items."""
    dcg = sum(1.0 / np.log2(r + 2) for r, i in enumerate(answer[:k]) if i in relevant)
    return dcg / sum(1.0 / np.log2(r + 2) for r in range(min(len(relevant), k)))


def two_stage_quality(args: argparse.Namespace) -> dict:
    """``/recommend`` vs ``/retrieve`` on a held-out day, in process: a slate world of ``days + 1`` days, the retrain
    flow (ranking stage at S = ``args.seq_len``) on the first ``days``, then the last day's requests in time order,
    the events before each request ingested as live events first (so sequences hold the session), each request
    asked three ways: /retrieve, /recommend with the two-tower generator alone, /recommend with both generators.
    NDCG@10 and HR@10 of the request's engaged items (click, save, conversion) that the release knows, requests with
    at least one (items created after the release are left out: neither stage can return them)."""
    import torch
    from mlflow import MlflowClient

    from bench.common import bench_data_root
    from towerflow.config import (
        ExamplesConfig,
        GateConfig,
        RankerGateConfig,
        RetrainConfig,
        Settings,
        TrainConfig,
    )
    from towerflow.data.source import ParquetSource
    from towerflow.data.synthetic import generate_world
    from towerflow.flows.retrain import retrain
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.realtime.store import SQLiteActionStore
    from towerflow.serving.service import RetrievalService

    world = WorldConfig(n_users=args.users, n_items=args.items, days=args.days + 1,
                        events_per_day=args.requests_per_day, slate_size=args.slate, seed=args.world_seed or 0)
    with bench_data_root(None, "towerflow-bench-two-stage-q-") as root:
        generate_world(str(root / "source"), world)
        as_of = pd.Timestamp(world.start, tz="UTC") + pd.Timedelta(days=args.days)
        cfg = RetrainConfig(
            examples=ExamplesConfig(max_seq_len=32), train=TrainConfig(epochs=args.epochs, num_threads=args.threads),
            gates=GateConfig(min_lift_over_popularity=-1.0, max_regression=1.0),
            ranker=RankerStageConfig(train=RankerTrainConfig(
                model=RankerConfig(max_seq_len=args.seq_len, cross_rank=args.cross_rank,
                                   time_window_prob=args.window_prob, affinity_features=not args.no_affinity,
                                   retrieval_score=not args.no_retrieval_score,
                                   retrieval_weight=0.0 if args.no_retrieval_score else args.retrieval_weight),
                epochs=args.epochs, num_threads=args.threads),
                retrieved_negatives=args.retrieved_negatives,
                gate=RankerGateConfig(min_lift_over_baselines=-1.0, max_regression=1.0)))
        result = retrain(as_of=as_of.date(), lookback_days=args.days, config=cfg)
        if result.status != "promoted":
            raise RuntimeError(f"the retrain did not promote a release: {result.status}")
        settings = Settings()
        # the flow's own held-out ranking evaluation (mean AUC over heads), candidate beside its baselines
        flow_auc = {k.split(".")[1]: v for k, v in MlflowClient(settings.tracking_uri).get_run(
            result.mlflow_run_id).data.metrics.items() if k.startswith("ranker.") and k.endswith(".auc/mean")}
        # serve in process on --threads too: torch's default (every core) spins on a loaded 2-core machine, where
        # one request then took ~15x longer (replays of 600 s instead of 40 s at load average 5-6)
        torch.set_num_threads(args.threads)
        store = SQLiteActionStore(root / "realtime.sqlite")
        # online: h from the events before the day plus the live ones (the flow's refresh stored states as of the
        # source's end, which includes the held-out day)
        serving = {"compact_interval_s": None, "as_of": as_of.to_pydatetime(), "events_reload_s": 1e9,
                   "mode": "online"}
        both = RetrievalService(settings, ServingConfig(**serving), realtime=store).start(watch=False)
        alone = RetrievalService(settings, ServingConfig(**serving, cooccurrence_candidates=0),
                                 realtime=store).start(watch=False)
        day = ParquetSource(settings.source).read_events(as_of.to_pydatetime(), (as_of + pd.Timedelta(days=1))
                                                         .to_pydatetime()).sort_values(["ts", "event_id"], kind="stable")
        rows = json.loads(day.to_json(orient="records", date_format="iso", date_unit="us"))
        methods = {"retrieve": [], "recommend_two_tower": [], "recommend_both": []}
        hits = {m: [] for m in methods}
        pending: list[dict] = []
        vocab, skipped = both.bundle.vocab, 0
        t0 = time.perf_counter()
        for group in _requests_in_order(rows):
            if pending:
                both.ingest(pending)
                pending = []
            first = group[0]
            engaged = {r["item_id"] for r in group if r["action"] in POSITIVE_ACTIONS}
            # items the release was not trained on (created since) no release can answer, nor its ranker score
            relevant = {i for i in engaged if vocab.item_index([i])[0] > 0}
            skipped += bool(engaged) and not relevant
            if relevant:
                ctx = first.get("context_item_id")
                ctx = int(ctx) if ctx is not None and vocab.item_index([int(ctx)])[0] > 0 else None
                query = first.get("query") if first["surface"] == "search" else None
                ask = (first["user_id"], ctx, first["surface"])
                answers = {"retrieve": both.retrieve(*ask, k=10, query=query),
                           "recommend_two_tower": alone.recommend(*ask, k=10, candidates=200, query=query),
                           "recommend_both": both.recommend(*ask, k=10, candidates=200, query=query)}
                for m, a in answers.items():
                    ids = [x["item_id"] for x in a["items"]]
                    methods[m].append(_ndcg(ids, relevant))
                    hits[m].append(float(bool(relevant & set(ids))))
            pending.extend(group)
        seconds = time.perf_counter() - t0
        both.close()
        alone.close()
    out = {m: {"ndcg@10": float(np.mean(v)), "hr@10": float(np.mean(hits[m])), "requests": len(v)}
           for m, v in methods.items()}
    base = out["retrieve"]["ndcg@10"]
    return {"methods": out, "release": result.release_id, "replay_seconds": round(seconds, 1),
            "flow_ranker_holdout_auc_mean": flow_auc,
            "requests_engaging_only_items_new_to_the_release": skipped,
            "ndcg_ratio_recommend_both_vs_retrieve": out["recommend_both"]["ndcg@10"] / base if base else None,
            "ndcg_ratio_recommend_two_tower_vs_retrieve": out["recommend_two_tower"]["ndcg@10"] / base if base
            else None, "holdout_day": str(as_of.date()), "world": world.model_dump(mode="json")}


def two_stage_seeds(args: argparse.Namespace, argv: list[str]) -> dict:
    """``two_stage_quality`` for worlds of seeds 0 .. ``args.seeds`` - 1, each in its own process (a fresh data
    root and Prefect API per world) -> per-seed results, NDCG@10 / HR@10 means, and the /recommend vs /retrieve
    ratio per seed and of the means."""
    seeds = []
    with tempfile.TemporaryDirectory(prefix="bench-two-stage-seeds-") as d:
        for seed in range(args.seeds):
            out = Path(d) / f"seed{seed}.json"
            subprocess.run([sys.executable, "-m", "bench.ranking", *argv, "--world-seed", str(seed),
                            "--child-out", str(out)], check=True)
            seeds.append(json.loads(out.read_text()))
    methods = {m: {k: float(np.mean([s["methods"][m][k] for s in seeds])) for k in ("ndcg@10", "hr@10", "requests")}
               for m in seeds[0]["methods"]}
    base = methods["retrieve"]["ndcg@10"]
    return {"methods": methods, "seeds": seeds,
            "ndcg_ratio_recommend_both_vs_retrieve": methods["recommend_both"]["ndcg@10"] / base,
            "ndcg_ratio_recommend_two_tower_vs_retrieve": methods["recommend_two_tower"]["ndcg@10"] / base,
            "ndcg_ratio_recommend_both_vs_retrieve_per_seed": [s["ndcg_ratio_recommend_both_vs_retrieve"]
                                                               for s in seeds]}


def _requests_in_order(rows: list[dict]) -> list[list[dict]]:
    """Each request's rows, requests in order of first appearance: a request_id, or one (user, ts, surface)."""
    groups: dict = {}
    for r in rows:
        key = r.get("request_id") or (r["user_id"], r["ts"], r["surface"])
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _cooccurrence_fit_seconds() -> float:
    """Seconds to fit /recommend's co-occurrence generator for the champion (what a service pays at each load)."""
    from towerflow.config import Settings
    from towerflow.infra.releases import load_release
    from towerflow.serving.cooccurrence import fit_for_release
    from towerflow.tasks.vocabulary import Vocab

    settings = Settings()
    release = load_release(settings)
    vocab = Vocab.from_json((release.vocab_dir / "vocab.json").read_text())
    t0 = time.perf_counter()
    if fit_for_release(release, vocab, settings) is None:
        raise RuntimeError("the co-occurrence generator could not be fitted for the benchmark's release")
    return round(time.perf_counter() - t0, 2)


def summarize(seeds: list[dict]) -> tuple[list[dict], dict]:
    """Per-method means over seeds, and the issue's targets checked on every seed."""
    rows = []
    for m in METHODS:
        row = {"method": m}
        for key in ["auc/mean"] + [f"gauc/{h}" for h in ("click", "hide")] + [f"hit@3/{h}" for h in RANKER_HEADS]:
            row[key] = float(np.mean([s["methods"][m][key] for s in seeds]))
        rows.append(row)
    gains = []
    for s in seeds:
        t, b = s["methods"]["transact"], s["methods"]["no_sequence"]
        gains.append({h: t[f"hit@3/{h}"] / b[f"hit@3/{h}"] - 1 for h in RANKER_HEADS})
    targets = {
        "positive_heads_hit3_gain_min": min(g[h] for g in gains for h in POSITIVE_ACTIONS),
        "hide_hit3_change_max": max(g["hide"] for g in gains),
    }
    targets["met_positive_+10%_every_seed"] = targets["positive_heads_hit3_gain_min"] >= 0.10
    targets["met_hide_-15%_every_seed"] = targets["hide_hit3_change_max"] <= -0.15
    return rows, {"per_seed_hit3_gain_vs_no_sequence": gains, **targets}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--days", type=int, default=5, help="the last one is the holdout")
    p.add_argument("--requests-per-day", type=int, default=1500, help="session steps (requests) per day")
    p.add_argument("--slate", type=int, default=8, help="items shown per request")
    p.add_argument("--seq-len", type=int, default=32, help="S of the compared rankers")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--cross-rank", type=int, default=32, help="low-rank cross layers (0: full rank)")
    p.add_argument("--window-prob", type=float, default=0.1,
                   help="share of training rows with the time-window mask (the world's sessions last minutes: a "
                        "1-hour window hides the whole session)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-reps", type=int, default=300)
    p.add_argument("--movielens", default=None, help="a MovieLens source (towerflow data import movielens): also "
                                                     "compare the rankers' AUC on its ratings")
    p.add_argument("--ml-epochs", type=int, default=6)
    p.add_argument("--name", default="ranking")
    p.add_argument("--http", action="store_true", help="instead: /recommend beside /retrieve over HTTP (a slate "
                                                       "world, the retrain flow with its ranking stage at --seq-len)")
    p.add_argument("--http-users", type=int, default=150, help="--http: users asked (the most active ones)")
    p.add_argument("--http-train-requests", type=int, default=3000, help="--http: the ranker's training requests")
    p.add_argument("--no-affinity", action="store_true", help="--two-stage: the flow's ranker without the affinity "
                                                              "features (RankerConfig.affinity_features, the before)")
    p.add_argument("--no-retrieval-score", action="store_true",
                   help="--two-stage: the flow's ranker without the retrieval score (RankerConfig.retrieval_score)")
    stage = RankerStageConfig()  # --two-stage: the retrain flow's defaults unless told otherwise
    p.add_argument("--retrieved-negatives", type=int, default=stage.retrieved_negatives,
                   help="--two-stage: RankerStageConfig.retrieved_negatives (retrieved, unshown items per training "
                        "request as rows without engagement; default: the flow's)")
    p.add_argument("--retrieval-weight", type=float, default=stage.train.model.retrieval_weight,
                   help="--two-stage: RankerConfig.retrieval_weight (u . v's weight in the blended score; default: "
                        "the flow's)")
    p.add_argument("--two-stage", action="store_true", help="instead: /recommend vs /retrieve NDCG@10 on a held-out "
                                                            "day replayed in process (one generator and both), for "
                                                            "worlds of seeds 0 .. --seeds - 1, one process each")
    p.add_argument("--world-seed", type=int, default=None, help="--two-stage: this world's seed alone, in process")
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)  # a --two-stage seed's result, for its parent
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1 (worlds to run), got {args.seeds}")
    args.cross_rank = args.cross_rank or None
    if args.two_stage and args.world_seed is None:
        out = two_stage_seeds(args, list(argv if argv is not None else sys.argv[1:]))
        for m in out["methods"]:
            print(f"  {m}: NDCG@10 " + ", ".join(f"{s['methods'][m]['ndcg@10']:.4f}" for s in out["seeds"])
                  + f" (mean {out['methods'][m]['ndcg@10']:.4f})")
        print("  /recommend (both generators) vs /retrieve NDCG@10 per seed: "
              + ", ".join(f"{r:.3f}x" for r in out["ndcg_ratio_recommend_both_vs_retrieve_per_seed"])
              + f"; of the means {out['ndcg_ratio_recommend_both_vs_retrieve']:.3f}x (target 1.1x)")
        write_result(args.name, {"args": vars(args), **out}, command_line("bench.ranking", argv))
        return
    if args.two_stage:
        out = two_stage_quality(args)
        print_table([{"method": m, **v} for m, v in out["methods"].items()],
                    [("method", "method", ""), ("requests", "requests", ""), ("NDCG@10", "ndcg@10", ".4f"),
                     ("HR@10", "hr@10", ".4f")], title=f"held-out day {out['holdout_day']}, engaged items of each "
                                                        f"request, S = {args.seq_len}")
        print(f"  /recommend (both generators) vs /retrieve NDCG@10: "
              f"{out['ndcg_ratio_recommend_both_vs_retrieve']:.3f}x (target 1.1x); two-tower alone "
              f"{out['ndcg_ratio_recommend_two_tower_vs_retrieve']:.3f}x")
        print("  the flow's held-out mean AUC over heads: " + ", ".join(
            f"{m} {v:.3f}" for m, v in sorted(out["flow_ranker_holdout_auc_mean"].items())))
        if args.child_out:  # one seed of two_stage_seeds: the parent writes the result
            Path(args.child_out).write_text(json.dumps(out, default=str))
            return
        write_result(args.name, {"args": vars(args), **out}, command_line("bench.ranking", argv))
        return
    if args.http:
        out = two_stage_http(args)
        print_table(out["rows"], [("endpoint", "endpoint", ""), ("requests", "requests", ""),
                                  ("p50 ms", "p50_ms", ".2f"), ("p99 ms", "p99_ms", ".2f")],
                    title=f"over HTTP, 1 client alternating, S = {args.seq_len} (mean sequence fill "
                          f"{out['sequence_fill_mean']:.0f}), 200 candidates")
        write_result(args.name, {"args": vars(args), **out}, command_line("bench.ranking", argv))
        return

    seeds = []
    for seed in range(args.seeds):
        seeds.append(run_seed(seed, args))
        print_table([{"method": m, **seeds[-1]["methods"][m]} for m in METHODS],
                    [("method", "method", "")] + [(k, k, ".4f") for k in
                                                  ["auc/mean"] + [f"hit@3/{h}" for h in RANKER_HEADS]],
                    title=f"seed {seed}: {seeds[-1]['holdout_requests']:,} holdout requests, "
                          f"{seeds[-1]['train_rows']:,} training rows, S = {args.seq_len}")
    rows, targets = summarize(seeds) if seeds else ([], {})  # --seeds 0: the latency alone
    if rows:
        cols = [("method", "method", "")] + [(k, k, ".4f") for k in rows[0] if k != "method"]
        print_table(rows, cols, title=f"mean over {args.seeds} seed(s)")
    for k, v in targets.items():
        if k != "per_seed_hit3_gain_vs_no_sequence":
            print(f"  {k}: {v if isinstance(v, bool) else f'{v:+.3f}'}")
    movielens = run_movielens(args.movielens, args) if args.movielens else None
    if movielens:
        print_table([{"method": m, **v} for m, v in movielens["methods"].items()],
                    [("method", "method", ""), ("AUC 4-5 vs 1-2 stars", "auc", ".4f"), ("se", "se", ".4f"),
                     ("epochs", "epochs", "")],
                    title=f"MovieLens {movielens['scored_rows']:,} held-out ratings (time split), S = {args.seq_len}")
        print(f"  AUC gain {movielens['auc_gain']:+.4f} = {movielens['gain_in_se']:.1f} standard errors")
    lat = latency(200, args.latency_reps)
    print_table(lat, [("widths", "widths", ""), ("d_model", "d_model", ""), ("S", "seq_len", ""),
                      ("candidates", "candidates", ""), ("path", "path", ""), ("p50 ms", "p50_ms", ".2f"),
                      ("p99 ms", "p99_ms", ".2f"), ("cpu p50 ms", "cpu_p50_ms", ".2f"),
                      ("cpu p99 ms", "cpu_p99_ms", ".2f")], title="ranking latency, 1 thread, in process")
    write_result(args.name, {"args": vars(args), "summary": rows, "targets": targets, "seeds": seeds,
                             "movielens": movielens,
                             "latency": lat, "negative_heads": list(NEGATIVE_ACTIONS)},
                 command_line("bench.ranking", argv))


if __name__ == "__main__":
    main()
