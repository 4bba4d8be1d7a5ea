"""Benchmark: the retrain flow end to end on the demo world, the share of its wall time spent in each stage, and
the orchestration overhead: the Prefect flow against the same stage functions called as plain functions.

    python -m bench.retrain_e2e [--epochs 3] [--lookback-days 7] [--threads N]

The demo world is ``WorldConfig()`` (2,000 users, 3,000 items, 14 days x 20,000 events); the window is its last
``--lookback-days`` days. One fresh process (its own temporary data roots and PREFECT_HOME, Prefect's ephemeral
API) does, in order:

1. imports everything, starts the API with a trivial flow and creates both MLflow stores (not timed: a deployed
   retrain finds all of them up);
2. the **plain** pipeline: the pure stage functions (tasks/, validation/, infra/) in the flow's order on data root A,
   each timed, ending with the release registered and promoted in MLflow;
3. the **flow**: ``flows.retrain.retrain`` on data root B; each stage's time is its Prefect task run's
   ``total_run_time``, read back from the API.

Orchestration overhead = flow wall time / plain wall time, from this one run. It covers everything the flow adds
around the same computation: task and flow run state changes, logs and artifacts sent to the Prefect API, MLflow
params/metrics/plots/gate reports, checkpoints and resumable work directories. ``gaps`` is the flow's wall time
not inside any task run. Training dominates both and its speed swings with other load on a shared machine, so the
overhead outside ``train`` is reported too. Prints a table and writes ``bench/results/retrain_e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import command_line, peak_rss_mib, print_table, write_result

STAGES = ("start_tracking", "extract", "validate_data", "build_examples", "augment_context", "train", "evaluate",
          "gate_model", "embed_items", "build_index", "assemble_release", "gate_release", "promote",
          "finish_tracking", "refresh-user-states")


def run_plain(settings, source_uri: str, end: datetime, lookback_days: int, config) -> tuple[dict[str, float], dict]:
    """The flow's stages as plain calls of the same pure functions the flow's tasks call, in the flow's order
    -> (seconds per stage, info). No champion exists on this data root, so ``evaluate`` scores none."""

    from towerflow.data.source import ParquetSource
    from towerflow.infra.promote import promote, register_release
    from towerflow.infra.releases import assemble, embed_release_items, load_release_dir
    from towerflow.serving.retrieval import answer
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.build_index import build_index
    from towerflow.tasks.compare import evaluate_candidate
    from towerflow.tasks.extract import extract
    from towerflow.tasks.refit import augment_examples, refit_wanted
    from towerflow.tasks.train import train
    from towerflow.validation.data import validate_extracted
    from towerflow.validation.embeddings import check_embeddings
    from towerflow.validation.index import gate_index_on_holdout
    from towerflow.validation.model import gate_model, slices_by_name
    from towerflow.validation.release import gate_release_on_holdout

    times: dict[str, float] = {}

    def stage(name: str, fn):
        t0 = time.perf_counter()
        value = fn()
        times[name] = time.perf_counter() - t0
        return value

    snapshot = stage("extract", lambda: extract(ParquetSource(source_uri), end, lookback_days, settings.snapshots_dir))
    stop = snapshot.window[1]
    stage("validate_data", lambda: validate_extracted(snapshot, None, config.gates).raise_if_failed())
    examples = stage("build_examples", lambda: build_examples(snapshot.events(), snapshot.users(), snapshot.items(),
                                                              stop, config.examples))
    # as the flow's stage: the refit's rows augmented only when a refit will train on them (the stage's time)
    examples = stage("augment_context", lambda: augment_examples(
        examples, config.augment, refit_wanted(config.train, examples)[0])[0])
    trained = stage("train", lambda: train(examples, config.train))
    ev = stage("evaluate", lambda: evaluate_candidate(trained.model, examples, config.eval,
                                                      refit=trained.refit_epochs > 0))
    stage("gate_model", lambda: gate_model(ev.candidate, None, ev.baselines,
                                           slices_by_name(ev.slices, None, ev.baseline_slices),
                                           config.gates).raise_if_failed())

    def embed():
        emb = embed_release_items(trained.model, examples.vocab, model_version="plain")
        check_embeddings(emb.vectors, config.gates, seed=0).raise_if_failed()
        return emb

    emb = stage("embed_items", embed)

    def index_and_check():
        index = build_index(emb, config.index)
        gate_index_on_holdout(index.search, emb.vectors, emb.item_ids, trained.model, examples.holdout,
                              examples.user_feats, config.index, config.gates).raise_if_failed()
        return index

    index = stage("build_index", index_and_check)

    manifest = stage("assemble_release", lambda: assemble(
        settings.releases_dir, model=trained.model, vocab=examples.vocab, embeddings=emb, index=index, config=config,
        snapshot_id=snapshot.snapshot_id, candidate_metrics=ev.candidate))

    def gate_release():
        release = load_release_dir(manifest.path)
        gate_release_on_holdout(lambda batch, k: answer(release, batch, k)[0], examples.holdout, examples.user_feats,
                                manifest.release_id, len(release.item_ids), config.gates).raise_if_failed()

    stage("gate_release", gate_release)
    promoted = stage("promote", lambda: promote(register_release(manifest.path, None, settings), settings,
                                                expected_champion=None))
    if config.refresh_user_states:  # the flow's subflow after a promotion: the same pure functions
        stage("refresh-user-states", lambda: refresh_states(settings, source_uri))
    info = {"epochs_run": len(trained.history), "train_examples": len(examples.train),
            "recall_at_10": round(ev.candidate["recall@10"], 4), "promoted": bool(promoted.changed)}
    return times, info


def refresh_states(settings, source_uri: str) -> int:
    """What the refresh-user-states flow computes for the champion, as plain calls -> states stored."""
    from towerflow.data.source import ParquetSource
    from towerflow.infra.releases import load_release
    from towerflow.serving.bundle import build_bundle
    from towerflow.serving.history import source_horizon
    from towerflow.serving.state_store import SQLiteUserStateStore
    from towerflow.serving.states import compute_user_states, refresh_events
    from towerflow.tasks.history import to_us

    bundle = build_bundle(load_release(settings), users=None)
    source = ParquetSource(source_uri)
    as_of = source_horizon(source.days())
    events, _ = refresh_events(source, as_of, bundle.history.max_history_days, None)
    states = list(compute_user_states(bundle.release, bundle.vocab, events, to_us(as_of), bundle.history,
                                      item_table=bundle.item_table))
    store = SQLiteUserStateStore(settings.user_states_path)
    try:
        store.put(states)
        store.prune(3)
    finally:
        store.close()
    return len(states)


def prefect_floor(n_tasks: int = 15, repeats: int = 3) -> dict[str, float]:
    """Prefect's own cost on this API, now: an empty flow run (start to end, as the caller waits for it), and an
    empty task run (the retrain stages' decorator, flows/stages.py), timed inside a flow around ``n_tasks`` of
    them; the median of ``repeats``."""
    import statistics

    from prefect import flow

    from towerflow.flows.stages import stage

    @stage("empty")
    def empty(x):
        return x

    @flow(name="bench-empty-tasks")
    def chain(n: int) -> float:
        x, t0 = 0, time.perf_counter()
        for _ in range(n):
            x = empty(x)
        return (time.perf_counter() - t0) / max(n, 1)

    flows, tasks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(0)
        flows.append(time.perf_counter() - t0)
        tasks.append(chain(n_tasks))
    return {"empty_flow_s": round(statistics.median(flows), 3), "empty_task_s": round(statistics.median(tasks), 4)}


def task_run_seconds(flow_run_id) -> dict[str, float]:
    """Seconds of each task run of a flow run, by task name, as the Prefect API recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, float] = {}
    for r in runs:
        name = r.name.rsplit("-", 1)[0]  # "train-2d4" -> "train"
        out[name] = out.get(name, 0.0) + r.total_run_time.total_seconds()
    return out


def _child(out_path: str, epochs: int, lookback_days: int, threads: int | None) -> None:
    import great_expectations  # noqa: F401
    import matplotlib.pyplot  # noqa: F401 - evaluate's recall plot: 1.4 s the first time, an import like the others
    import mlflow  # noqa: F401
    import torch
    from prefect import flow

    import towerflow.flows.retrain  # noqa: F401 - imports are not what the benchmark times
    import towerflow.serving.retrieval  # noqa: F401
    from towerflow.config import RetrainConfig, Settings, WorldConfig
    from towerflow.data.synthetic import generate_world
    from towerflow.flows.retrain import retrain
    from towerflow.infra.tracking import ensure_store

    if threads:
        torch.set_num_threads(threads)
    root = Path(os.environ["TOWERFLOW_BENCH_ROOT"])
    world = WorldConfig()
    t0 = time.perf_counter()
    summary = generate_world(str(root / "source"), world)
    generate_s = time.perf_counter() - t0
    as_of = world.start + timedelta(days=world.days)
    end = datetime.combine(as_of, datetime.min.time(), tzinfo=UTC)
    config = RetrainConfig.model_validate({"train": {"epochs": epochs}})  # validated, unlike model_copy(update=)
    plain_settings, flow_root = Settings(data_root=root / "plain"), root / "flow"
    os.environ["TOWERFLOW_DATA_ROOT"] = str(flow_root)  # what the flow's Settings() reads

    t0 = time.perf_counter()
    flow(name="bench-warm-up")(lambda: None)()  # starts the ephemeral API (database migrations)
    api_start_s = time.perf_counter() - t0
    ensure_store(plain_settings)
    ensure_store(Settings())

    t0 = time.perf_counter()
    plain, info = run_plain(plain_settings, str(root / "source"), end, lookback_days, config)
    plain_wall = time.perf_counter() - t0

    floor = prefect_floor()  # on the same API, in the same run, just before the flow
    t0 = time.perf_counter()
    state = retrain(as_of=as_of, lookback_days=lookback_days, config=config, source_uri=str(root / "source"),
                    return_state=True)
    flow_wall = time.perf_counter() - t0
    result = state.result()
    tasks = task_run_seconds(state.state_details.flow_run_id)
    # the flow's extra time outside training (whose speed swings with other load), less the cost of its own flow
    # run (an empty one's), spread over its task runs (the subflow counts as one)
    n_tasks = len(tasks)
    outside_train = (flow_wall - tasks.get("train", 0.0)) - (plain_wall - plain["train"])
    per_task = (outside_train - floor["empty_flow_s"]) / n_tasks

    doc = {
        "world": world.model_dump(mode="json"), "events_in_world": summary.events, "generate_s": round(generate_s, 2),
        "as_of": as_of.isoformat(), "lookback_days": lookback_days, "epochs": epochs,
        "train_config": config.train.model_dump(mode="json"),
        "torch_threads": torch.get_num_threads(), "api_start_s": round(api_start_s, 2),
        "prefect_api": os.environ.get("PREFECT_API_URL") or "ephemeral",
        "plain": {"wall_s": round(plain_wall, 3), "stages_s": {k: round(v, 3) for k, v in plain.items()}, **info},
        "flow": {"wall_s": round(flow_wall, 3), "stages_s": {k: round(v, 3) for k, v in tasks.items()},
                 "status": result.status, "recall_at_10": round(result.metrics.get("recall@10", float("nan")), 4),
                 "gaps_s": round(flow_wall - sum(tasks.values()), 3)},
        "overhead_ratio": round(flow_wall / plain_wall, 3),
        # what Prefect itself costs here (empty flow, empty task), and the flow's extra time per task run:
        # (extra outside train - an empty flow run) / task runs, against an empty task run
        "prefect_floor": floor, "task_runs": n_tasks,
        "overhead_per_task_s": round(per_task, 4),
        "per_task_ratio_to_empty_task": round(per_task / floor["empty_task_s"], 2),
        # training dominates and its speed swings with other load on a shared machine; the rest is the fixed cost
        "overhead_outside_train_s": round((flow_wall - tasks.get("train", 0.0)) - (plain_wall - plain["train"]), 3),
        "overhead_ratio_outside_train": round((flow_wall - tasks.get("train", 0.0)) / (plain_wall - plain["train"]), 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    Path(out_path).write_text(json.dumps(doc, indent=2))


COLUMNS = [("stage", "stage", ""), ("flow s", "flow_s", ".2f"), ("flow share", "flow_share", ".1%"),
           ("plain s", "plain_s", ".2f"), ("plain share", "plain_share", ".1%"), ("flow - plain s", "extra_s", "+.2f")]


def stage_rows(doc: dict) -> list[dict]:
    flow, plain = doc["flow"], doc["plain"]
    rows = []
    for name in STAGES:
        f, p = flow["stages_s"].get(name), plain["stages_s"].get(name)
        rows.append({"stage": name, "flow_s": f, "plain_s": p,
                     "flow_share": None if f is None else f / flow["wall_s"],
                     "plain_share": None if p is None else p / plain["wall_s"],
                     "extra_s": None if f is None else f - (p or 0.0)})
    rows.append({"stage": "(gaps between tasks)", "flow_s": flow["gaps_s"], "flow_share": flow["gaps_s"] / flow["wall_s"]})
    rows.append({"stage": "total wall", "flow_s": flow["wall_s"], "flow_share": 1.0, "plain_s": plain["wall_s"],
                 "plain_share": 1.0, "extra_s": flow["wall_s"] - plain["wall_s"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="train.epochs for both runs (default 3)")
    p.add_argument("--lookback-days", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, all cores)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.epochs, args.lookback_days, args.threads)
        return {}

    with tempfile.TemporaryDirectory(prefix="towerflow-bench-e2e-") as tmp:
        # A fresh interpreter, not a multiprocessing child: it exits normally, so Prefect's ephemeral API server
        # (a subprocess) is shut down by its atexit hook instead of being orphaned.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOWERFLOW_", "MLFLOW_TRACKING_URI"))}
        env |= {"TOWERFLOW_BENCH_ROOT": tmp, "PREFECT_HOME": f"{tmp}/prefect",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                # a fresh database migrates at start-up: past the default 20 s on a busy 2-core machine
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                "GIT_PYTHON_REFRESH": "quiet"}
        out = f"{tmp}/result.json"
        cmd = [sys.executable, "-m", "bench.retrain_e2e", "--child", out, "--epochs", str(args.epochs),
               "--lookback-days", str(args.lookback_days)] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, env=env, check=True)
        doc = json.loads(Path(out).read_text())

    print_table(stage_rows(doc), COLUMNS, title=f"retrain on the demo world: {doc['lookback_days']}-day window, "
                                                 f"{doc['epochs']} epoch(s), {doc['torch_threads']} torch thread(s)")
    print(f"\nflow {doc['flow']['wall_s']:.1f}s vs plain {doc['plain']['wall_s']:.1f}s: orchestration overhead "
          f"x{doc['overhead_ratio']:.2f} ({doc['flow']['status']}; recall@10 flow {doc['flow']['recall_at_10']}, "
          f"plain {doc['plain']['recall_at_10']}); API start-up {doc['api_start_s']:.1f}s not counted")
    print(f"outside train: flow adds {doc['overhead_outside_train_s']:.1f}s "
          f"(x{doc['overhead_ratio_outside_train']:.2f} of the plain stages' time)")
    fl = doc["prefect_floor"]
    print(f"Prefect on this API, same run: empty flow {fl['empty_flow_s']:.2f}s, empty task {fl['empty_task_s']:.3f}s; "
          f"the flow's extra outside train, less one empty flow, per task run: {doc['overhead_per_task_s']:.3f}s "
          f"over {doc['task_runs']} task runs = x{doc['per_task_ratio_to_empty_task']:.2f} an empty task")
    write_result("retrain_e2e", doc, command_line("bench.retrain_e2e", argv))
    return doc


if __name__ == "__main__":
    main()
