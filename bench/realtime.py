"""Benchmark: live events, from ``POST /events`` to the next ``/retrieve`` (issue #16's freshness and ingest targets).

    python -m bench.realtime [--quick] [--seconds 15] [--rps 100] [--ingest-rate 5000] [--data-root DIR]

Setup: the world and releases of ``bench.serving`` (``prepare``: the champion's states refreshed).

1. Recompute choice, in process: the per-request cost of a user whose state is older than their newest live action
   (``/retrieve`` re-encodes h from source + live actions: path ``live``) against the stored-state path, and the
   cost of the alternative, re-encoding on ingest the h of every user a batch touches (batched), per event.
2. Over HTTP (``towerflow serve`` in a subprocess, its embedded action store fresh, background compaction on):
   ``/retrieve`` at ``--rps`` requests/s, open loop, for ``--seconds``: p50/p99 with no ingestion; then the same
   load while two clients post batches of 300 events (made before the phase), first paced at ``--ingest-rate``
   events/s together (the target: the events/s reached and what it costs /retrieve), then as fast as the server
   acknowledges them (its capacity beside the /retrieve load); in both, a probe every 0.2 s measures freshness:
   a user's top item is clicked via ``POST /events``; from the acknowledgement to the first ``/retrieve`` answer
   that no longer holds it (``exclude_seen``).

3. Value (``--value``; a world of its own under ``<data root>/value``): a champion trained on every day but the last,
   its states refreshed at the start of the last day; that day replayed in time order (``towerflow events
   replay``'s ``replay``, in process), ``/retrieve`` asked before each engagement, once with realtime ingestion and
   once with the states frozen at the start of the day: recall@10 of each next engagement, and their ratio. A
   third replay also posts the day's new items (``POST /items``, each at its creation time): recall@10 of the
   engagements with items created that day, with live items and without (the release was built before them).

Prints a table and writes ``bench/results/realtime.json``. The world's source is left as prepared (the compacted
``rt-*`` files and the action store are removed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_data_root, code_version, machine_info, write_result
from bench.serving import Server, _Connection, _pct, _retrain_config, prepare

RESULTS = Path(__file__).resolve().parent / "results" / "realtime.json"
BATCH = 300  # events per POST: about 45 KB, under the service's 64 KiB body limit


def _world_ids(root: Path) -> tuple[list[int], np.ndarray, datetime]:
    """(users with a champion state, the champion's item ids, the world's horizon)."""
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource
    from towerflow.infra.releases import load_release
    from towerflow.serving.state_store import SQLiteUserStateStore

    settings = Settings(data_root=root)
    info = json.loads((root / "bench-ready.json").read_text())
    users = sorted(int(u) for u in ParquetSource(settings.source).read_users()["user_id"])
    active = sorted(SQLiteUserStateStore(settings.user_states_path).get(users, info["champion"]["release"]))
    return active, load_release(settings).item_ids, datetime.fromisoformat(info["as_of"])


class Events:
    """Synthetic live clicks: unique ids, times after the world's horizon, users with a state, release items."""

    def __init__(self, users: list[int], items: np.ndarray, t0: datetime, tag: str, seed: int = 0):
        self.users, self.items, self.t0, self.tag = np.array(users), items, t0, tag
        self.rng, self.n = np.random.default_rng(seed), 0

    def one(self, user: int, item: int) -> dict:
        self.n += 1
        return {"event_id": f"{self.tag}-{self.n}", "user_id": int(user), "item_id": int(item), "action": "click",
                "ts": (self.t0 + timedelta(milliseconds=self.n)).isoformat(), "surface": "homefeed"}

    def batch(self, n: int) -> list[dict]:
        users, items = self.rng.choice(self.users, n).tolist(), self.rng.choice(self.items, n).tolist()
        return [self.one(u, i) for u, i in zip(users, items, strict=True)]

    def bodies(self, n: int) -> list[bytes]:
        """``n`` POST /events bodies of BATCH events each, made before a load phase: the load generator shares
        the 2 cores with the server, and making them on its event loop during the phase delayed the /retrieve
        requests it times and took CPU from the server it measures."""
        return [json.dumps({"events": self.batch(BATCH)}).encode() for _ in range(n)]


# ------------------------------------------------------------------------------------------------ 1. in process


def measure_recompute(root: Path, n_users: int = 300) -> dict[str, Any]:
    import torch

    from towerflow.config import Settings
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.realtime.live import merge
    from towerflow.serving.realtime.store import SQLiteActionStore, to_frame
    from towerflow.serving.service import RetrievalService
    from towerflow.serving.states import compute_user_states
    from towerflow.tasks.history import EventArrays

    torch.set_num_threads(1)
    users, items, horizon = _world_ids(root)
    users = users[:n_users]
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteActionStore(Path(tmp) / "rt.sqlite")
        svc = RetrievalService(Settings(data_root=root), ServingConfig(compact_interval_s=None),
                               realtime=store).start(watch=False)

        def timed(fn, args) -> np.ndarray:
            out = []
            for a in args:
                t0 = time.perf_counter()
                fn(a)
                out.append((time.perf_counter() - t0) * 1e3)
            return np.array(out)

        paths = {}

        def ask(u):
            paths[u] = svc.retrieve(u, k=10)["path"]

        state = timed(ask, users)
        assert set(paths.values()) == {"state"}, paths
        gen = Events(users, items, horizon + timedelta(hours=1), "recompute")
        svc.ingest([gen.one(u, gen.rng.choice(items)) for u in users])
        live = timed(ask, users)
        assert set(paths.values()) == {"live"}, set(paths.values())

        # the alternative: on ingest, re-encode (batched) the h of every user a batch touches
        b, recent = svc.bundle, svc._recent

        def on_ingest(batch: list[dict]) -> None:
            touched = sorted({e["user_id"] for e in batch})
            live_ev = EventArrays.from_events(to_frame([r for u in touched for r in store.recent(u)]))
            events = merge(recent.get(touched), live_ev)
            as_of = max(recent.as_of_us, int(live_ev.ts_us.max()) + 1)
            list(compute_user_states(b.release, b.vocab, events, as_of, b.history, item_table=b.item_table))

        batches = [gen.batch(BATCH) for _ in range(10)]
        for batch in batches:
            svc.ingest(batch)
        ingest_ms = timed(on_ingest, batches)
        svc.close()
    per_event = float(np.median(ingest_ms)) / BATCH
    extra = float(np.median(live) - np.median(state))
    return {"users": len(users), "state_path": _pct(state), "live_path": _pct(live),
            "per_request_extra_ms": round(extra, 3),
            "on_ingest_batch": {"events": BATCH, **_pct(ingest_ms)}, "on_ingest_ms_per_event": round(per_event, 4),
            "cpu_ms_per_s_at_5000_events_100_requests": {
                "per_request": round(100 * extra, 1), "on_ingest": round(5000 * per_event, 1)}}


# ------------------------------------------------------------------------------------------------ 2. over HTTP


def _clean(root: Path) -> None:
    """The world as prepared: no action store, no compacted live files."""
    for p in [root / "realtime.sqlite", root / "realtime.sqlite-wal", root / "realtime.sqlite-shm"]:
        p.unlink(missing_ok=True)
    for p in (root / "source" / "events").glob("dt=*/rt-*.parquet"):
        p.unlink()
    for d in (root / "source" / "events").glob("dt=*"):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


async def _paced(url: str, requests: list[dict], rps: float, seconds: float) -> list[float]:
    """/retrieve at ``rps`` requests per second, open loop (each sent at its time on a free connection)."""
    host, port = url.rsplit("//", 1)[1].split(":")
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(16):
        pool.put_nowait(_Connection(host, int(port)))
    lat: list[float] = []
    t0 = time.monotonic()

    async def one(i: int) -> None:
        conn = await pool.get()
        start = time.monotonic()
        status, _ = await conn.post("/retrieve", json.dumps(requests[i % len(requests)]).encode())
        lat.append((time.monotonic() - start) * 1e3 if status == 200 else float("nan"))
        pool.put_nowait(conn)

    tasks = []
    for i in range(int(rps * seconds)):
        await asyncio.sleep(max(0.0, t0 + i / rps - time.monotonic()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        await pool.get_nowait().close()
    return lat


async def _ingest(url: str, gen: Events, bodies: list[bytes], seconds: float, out: dict,
                  rate: float | None = None) -> None:
    """POST /events batches for ``seconds`` (the bodies made beforehand, then new ones): ``rate`` events/s (a batch
    every BATCH / rate s, open loop: a late batch goes at once, and the achieved rate shows any shortfall), or
    with ``rate`` None one after the other, as fast as the server acknowledges them."""
    host, port = url.rsplit("//", 1)[1].split(":")
    conn, t0, k = _Connection(host, int(port)), time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        if rate is not None:
            await asyncio.sleep(max(0.0, t0 + k * BATCH / rate - time.monotonic()))
            k += 1
            if time.monotonic() - t0 >= seconds:
                break
        body = bodies.pop(0) if bodies else json.dumps({"events": gen.batch(BATCH)}).encode()
        status, raw = await conn.post("/events", body)
        if status != 200:
            raise RuntimeError(f"POST /events: {status} {raw[:300]!r}")
        out["events"] += json.loads(raw)["accepted"]
    await conn.close()


async def _probes(url: str, gen: Events, users: list[int], seconds: float, out: list[dict]) -> None:
    host, port = url.rsplit("//", 1)[1].split(":")
    conn, t0, i = _Connection(host, int(port)), time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        user = users[i % len(users)]
        i += 1
        ask = json.dumps({"user_id": user, "k": 10}).encode()
        top = json.loads((await conn.post("/retrieve", ask))[1])["items"][0]["item_id"]
        status, _ = await conn.post("/events", json.dumps({"events": [gen.one(user, top)]}).encode())
        acked, tries = time.monotonic(), 0
        while True:
            tries += 1
            body = json.loads((await conn.post("/retrieve", ask))[1])
            if top not in [x["item_id"] for x in body["items"]] or time.monotonic() - acked > 5:
                break
        out.append({"ms": (time.monotonic() - acked) * 1e3, "tries": tries, "path": body["path"]})
        await asyncio.sleep(0.2)
    await conn.close()


def _loaded(server: Server, requests: list[dict], rps: float, seconds: float, gen: Events, users: list[int],
            rate: float | None, quiet_cpu_s: float) -> dict[str, Any]:
    """/retrieve at ``rps`` while two clients ingest (``rate`` events/s together, or as fast as acknowledged) and
    the freshness probes run: /retrieve latency, events/s, server CPU, freshness."""
    counts, probes = {"events": 0}, []
    bodies = gen.bodies(int(seconds * (rate or 20_000) / BATCH) + 2)  # (as fast as possible: enough for 20,000/s)
    per_client = None if rate is None else rate / 2

    async def run():
        return await asyncio.gather(_paced(server.url, requests, rps, seconds),
                                    _ingest(server.url, gen, bodies, seconds, counts, per_client),
                                    _ingest(server.url, gen, bodies, seconds, counts, per_client),
                                    _probes(server.url, gen, users[::-1], seconds, probes))

    cpu0, t0, load0 = server.cpu_s(), time.monotonic(), os.getloadavg()[0]
    busy = asyncio.run(run())[0]
    elapsed, cpu = time.monotonic() - t0, server.cpu_s() - cpu0
    fresh = np.array([p["ms"] for p in probes])
    return {
        "events_per_s_asked": rate, "load_average": round((load0 + os.getloadavg()[0]) / 2, 1),
        "retrieve": {**_pct(np.array(busy)), "server_cpu_s": round(cpu, 2)},
        "ingest": {"events": counts["events"], "events_per_s": round(counts["events"] / elapsed),
                   "batch": BATCH, "clients": 2,
                   # the server's CPU beyond what the same /retrieve load cost without ingestion, per event
                   "server_cpu_ms_per_event": round((cpu - quiet_cpu_s * elapsed / seconds) * 1e3
                                                    / max(1, counts["events"]), 3)},
        "freshness": {**_pct(fresh), "first_retrieve_reflected": int(sum(p["tries"] == 1 for p in probes)),
                      "paths": sorted({p["path"] for p in probes})},
    }


def measure_http(root: Path, rps: float, seconds: float, rate: float) -> dict[str, Any]:
    """Three phases on one server: /retrieve alone; with ingestion at ``rate`` events/s (the target); with
    ingestion as fast as the server acknowledges (its capacity while it answers /retrieve)."""
    from bench.serving import _requests

    users, items, horizon = _world_ids(root)
    requests = _requests(root, 2000)
    _clean(root)
    server = Server(root, "hybrid")
    try:
        server.wait_ready()
        asyncio.run(_paced(server.url, requests, rps, 2))  # warm up
        cpu0, load0 = server.cpu_s(), os.getloadavg()[0]
        quiet = asyncio.run(_paced(server.url, requests, rps, seconds))
        quiet_cpu = server.cpu_s() - cpu0
        gen = Events(users, items, horizon + timedelta(hours=2), f"http{int(time.time())}")
        without = {**_pct(np.array(quiet)), "server_cpu_s": round(quiet_cpu, 2),
                   "load_average": round((load0 + os.getloadavg()[0]) / 2, 1)}
        at_rate = _loaded(server, requests, rps, seconds, gen, users, rate, quiet_cpu)
        fastest = _loaded(server, requests, rps, seconds, gen, users, None, quiet_cpu)
    finally:
        server.stop()
        _clean(root)
    return {"rps": rps, "seconds": seconds, "retrieve_without_ingest": without, "ingest_at_rate": at_rate,
            "ingest_fastest": fastest}


# ------------------------------------------------------------------------------------------------ 3. value


class InProcess:
    """The replay's client, answered by a RetrievalService in this process (what /events and /retrieve call)."""

    def __init__(self, svc):
        self.svc = svc

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        from towerflow.serving.service import RequestError

        if path == "/events":
            return 200, self.svc.ingest(body["events"])
        if path == "/items":
            return 200, self.svc.add_items(body["items"])
        ctx = body.get("context", {})
        try:
            return 200, self.svc.retrieve(body["user_id"], ctx.get("item_id"), ctx.get("surface", "homefeed"),
                                          body["k"])
        except RequestError as exc:
            return 422, {"detail": str(exc)}


def value_retrain_config(quick: bool, trained: bool):
    """The value replay's champion: ``bench.serving``'s (one epoch), or with ``trained`` the default retrain config
    (up to 30 epochs, early stopping on the validation split's recall@10, 1 torch thread), its ranking stages off
    (``/retrieve`` does not use a ranker) and its gates open (the bench measures serving, not promotion)."""
    if not trained:
        return _retrain_config(quick, 0, promote=True)
    from towerflow.config import GateConfig, RankerStageConfig, RetrainConfig

    return RetrainConfig(gates=GateConfig(min_lift_over_popularity=-1.0, max_regression=1.0),
                         ranker=RankerStageConfig(enabled=False), promote=True)


def measure_value(root: Path, quick: bool, slate: int = 1, trained: bool = False) -> dict[str, Any]:
    """Section 3 on the world of ``bench.serving`` (with ``slate`` > 1: slates of that many items per request and
    as many events in all, sessions with a topic of their own), plus ``short_term_signal`` of its last day.
    ``trained``: the champion is trained to convergence (``value_retrain_config``), not for one epoch."""
    import torch

    from bench.serving import _world
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.realtime.replay import replay
    from towerflow.serving.realtime.store import SQLiteActionStore
    from towerflow.serving.service import RetrievalService

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    world = _world(quick)
    if slate > 1:
        world = world.model_copy(update={"slate_size": slate, "events_per_day": world.events_per_day // slate})
    last = world.start + timedelta(days=world.days - 1)
    day_start = datetime.combine(last, datetime.min.time(), tzinfo=UTC)
    ready = root / "value-ready.json"
    old_root = os.environ["TOWERFLOW_DATA_ROOT"]
    os.environ["TOWERFLOW_DATA_ROOT"] = str(root)
    try:
        if not ready.is_file():
            from towerflow.data.synthetic import generate_world
            from towerflow.flows.refresh_user_states import refresh_user_states
            from towerflow.flows.retrain import retrain

            generate_world(str(root / "source"), world)
            t0 = time.perf_counter()
            champion = retrain(as_of=last, lookback_days=min(7, world.days - 1),
                               config=value_retrain_config(quick, trained))
            refresh_user_states(release=champion.release_id, as_of=day_start, lookback_days=365, incremental=False)
            ready.write_text(json.dumps({"release": champion.release_id, "retrain_s": round(time.perf_counter() - t0),
                                         "holdout": champion.metrics}))
        settings = Settings(data_root=root)
        source = ParquetSource(settings.source)
        events, items = source.read_day(last), source.read_items()
        created = items[items["created_ts"].dt.date == last]
        out = {}
        for name in ("frozen", "realtime", "live_items"):
            with tempfile.TemporaryDirectory() as tmp:
                realtime, live_items = name != "frozen", name == "live_items"
                config = ServingConfig(as_of=day_start, compact_interval_s=None, realtime=realtime,
                                       live_items=live_items)
                svc = RetrievalService(settings, config, realtime=SQLiteActionStore(Path(tmp) / "rt.sqlite")
                                       if realtime else None).start(watch=False)
                load0 = os.getloadavg()[0]
                out[name] = replay(events, InProcess(svc), k=10, ingest=realtime, items=created,
                                   post_items=live_items).to_dict()
                out[name]["load_average"] = round((load0 + os.getloadavg()[0]) / 2, 1)  # the machine is shared
                out[name]["live_items_at_end"] = svc.status().get("live_items")
                svc.close()
    finally:
        os.environ["TOWERFLOW_DATA_ROOT"] = old_root
    champion_info = json.loads(ready.read_text())
    return {"day": last.isoformat(), "events": int(len(events)), **out,
            "model": {"trained": trained, "retrain_s": champion_info.get("retrain_s"),
                      "holdout": champion_info.get("holdout")},
            "recall_ratio_realtime_over_frozen": round(out["realtime"]["recall_at_k"]
                                                       / max(out["frozen"]["recall_at_k"], 1e-9), 3),
            # engagements on items the user had not acted on earlier that day: exclude_seen cannot drop them
            "new_items_recall_ratio": round(out["realtime"]["recall_at_k_new_items"]
                                            / max(out["frozen"]["recall_at_k_new_items"], 1e-9), 3),
            "items_created_that_day": int(len(created)), "slate_size": world.slate_size,
            "short_term_signal": short_term_signal(str(root / "source"), last)}


def short_term_signal(source_uri: str, day, history_days: int = 7) -> dict[str, Any]:
    """How much a user's actions of the same day tell about their next engagement beyond their longer-term profile,
    in the world itself (no model): per surface, over the engagements of ``day`` that follow an earlier one by the
    same user that day,

    - ``same_topic``: the share whose item's topic is the previous engagement's, against ``same_topic_expected``,
      the share that topic has in the user's engagements of the ``history_days`` before (what it would be if the
      day's engagements were drawn from the profile alone);
    - recall@10 of three topic-level guesses, each the 10 items most engaged in the days before within one topic:
      the user's most engaged topic of those days (``profile_topic``: what a frozen state knows), the previous
      engagement's topic (``previous_topic``: what the realtime path adds), the request's context item's topic
      where it has one (``context_topic``: what both frozen and realtime /retrieve are given), the engaged item's
      own topic (``true_topic``: a ceiling for guessing the topic right).
    """
    import pandas as pd

    from towerflow.contract import POSITIVE_ACTIONS
    from towerflow.data.source import ParquetSource

    source = ParquetSource(source_uri)
    topic = dict(zip(*source.read_items()[["item_id", "category"]].T.values, strict=True))

    def engagements(df: pd.DataFrame) -> pd.DataFrame:
        df = df[df["action"].isin(POSITIVE_ACTIONS)].sort_values(["ts", "event_id"], kind="stable").copy()
        df["topic"] = df["item_id"].map(topic)
        return df

    past = engagements(pd.concat([source.read_day(day - timedelta(days=k)) for k in range(1, history_days + 1)]))
    today = engagements(source.read_day(day))
    share = past.groupby(["user_id", "topic"]).size()
    share = (share / share.groupby(level=0).transform("sum")).to_dict()
    favourite = past.groupby("user_id")["topic"].agg(lambda s: s.value_counts().sort_index().idxmax()).to_dict()
    counts = past.groupby(["topic", "item_id"]).size().rename("n").reset_index()
    top10 = (counts.sort_values(["topic", "n", "item_id"], ascending=[True, False, True]).groupby("topic")["item_id"]
             .apply(lambda s: set(s.head(10))).to_dict())
    today["previous"] = today.groupby("user_id")["topic"].shift(1)
    today = today[today["previous"].notna()]
    today["profile"] = today["user_id"].map(favourite)
    today["context"] = today["context_item_id"].map(topic)
    today["expected"] = [share.get((u, t), 0.0) for u, t in zip(today["user_id"], today["previous"], strict=True)]

    def recall(g: pd.DataFrame, col: str) -> float | None:
        g = g[g[col].notna()]
        hits = [i in top10.get(t, ()) for i, t in zip(g["item_id"], g[col], strict=True)]
        return round(float(np.mean(hits)), 4) if hits else None

    out = {}
    for surface, g in [("all", today), *today.groupby("surface")]:
        out[surface] = {"engagements": int(len(g)), "same_topic": round(float((g["topic"] == g["previous"]).mean()), 4),
                        "same_topic_expected": round(float(g["expected"].mean()), 4),
                        "recall_at_10": {"profile_topic": recall(g, "profile"), "previous_topic": recall(g, "previous"),
                                         "context_topic": recall(g, "context"), "true_topic": recall(g, "topic")},
                        "context_topic_is_previous": round(float((g["context"] == g["previous"]).mean()), 4)}
    return out


def _report_load(r: dict) -> list[str]:
    rc, h = r["recompute"], r["http"]
    q = h["retrieve_without_ingest"]
    lines = [
        f"recompute: state path p50 {rc['state_path']['p50_ms']} ms, live path p50 {rc['live_path']['p50_ms']} ms "
        f"(+{rc['per_request_extra_ms']} ms/request); on ingest {rc['on_ingest_ms_per_event']} ms/event "
        f"-> CPU ms/s at 5000 events/s + 100 requests/s: {rc['cpu_ms_per_s_at_5000_events_100_requests']}",
        f"/retrieve at {h['rps']}/s without ingest: p50 {q.get('p50_ms')} ms, p99 {q.get('p99_ms')} ms "
        f"(load average {q['load_average']})"]
    for name, phase in (("at the target rate", h["ingest_at_rate"]), ("as fast as acknowledged", h["ingest_fastest"])):
        ret, ing, fr = phase["retrieve"], phase["ingest"], phase["freshness"]
        lines += [
            f"ingest {name}: {ing['events_per_s']} events/s (asked {phase['events_per_s_asked'] or 'max'}), "
            f"{ing['server_cpu_ms_per_event']} ms server CPU/event; /retrieve p50 {ret.get('p50_ms')} ms, "
            f"p99 {ret.get('p99_ms')} ms; load average {phase['load_average']}",
            f"  freshness (ack -> a /retrieve reflecting it): p50 {fr.get('p50_ms')} ms, p99 {fr.get('p99_ms')} ms "
            f"over {fr.get('n')} probes, {fr['first_retrieve_reflected']} reflected by the first /retrieve"]
    return lines


def report(r: dict) -> str:
    lines = _report_load(r) if "ingest_at_rate" in r.get("http", {}) else []  # (not a JSON of an older run's)
    for key in [k for k in r if k.startswith("value") and not k.endswith(("_command", "_when", "_code", "_machine"))]:
        v = r[key]
        s = v["short_term_signal"]["all"] if "short_term_signal" in v else None
        lines.append(f"{key} ({v['day']}, {v['frozen']['engagements']} engagements): recall@10 realtime "
                     f"{v['realtime']['recall_at_k']} vs frozen {v['frozen']['recall_at_k']} "
                     f"({v['recall_ratio_realtime_over_frozen']}x); on items not acted on earlier that day "
                     f"{v['realtime']['recall_at_k_new_items']} vs {v['frozen']['recall_at_k_new_items']} "
                     f"({v['new_items_recall_ratio']}x)")
        if "live_items" in v:
            li = v["live_items"]
            lines.append(f"items created that day ({v['items_created_that_day']} items, {li['created_engagements']} "
                         f"engagements): recall@10 with live items {li['recall_at_k_created_items']} vs without "
                         f"{v['realtime']['recall_at_k_created_items']} (realtime) / "
                         f"{v['frozen']['recall_at_k_created_items']} (frozen); all engagements "
                         f"{li['recall_at_k']} vs {v['realtime']['recall_at_k']}")
        if s is not None:
            g = s["recall_at_10"]
            lines.append(f"  the world's short-term signal: next engagement on the previous one's topic {s['same_topic']} "
                         f"(the 7-day profile predicts {s['same_topic_expected']}); topic-level recall@10 profile "
                         f"{g['profile_topic']}, previous engagement {g['previous_topic']}, true topic {g['true_topic']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny world and model (a smoke run, not the figures)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each load phase (default 15)")
    p.add_argument("--rps", type=float, default=100.0, help="/retrieve requests per second (default 100)")
    p.add_argument("--ingest-rate", type=float, default=5000.0,
                   help="events/s of the paced ingest phase (default 5000, issue #16's target); a last phase "
                        "ingests as fast as the server acknowledges")
    p.add_argument("--data-root", type=Path, help="reuse (or prepare) the world here instead of a temp dir")
    p.add_argument("--value", action="store_true", help="also replay a held-out day: realtime vs frozen recall")
    p.add_argument("--only-value", action="store_true", help="only the value replay (section 3)")
    p.add_argument("--slate", type=int, default=1,
                   help="the value world's slate size (default 1; N > 1: its own world under <data root>/value-slateN, "
                        "written as value_slateN)")
    p.add_argument("--trained", action="store_true",
                   help="the value replay's champion trained to convergence (the default retrain config: up to 30 "
                        "epochs, early stopping) instead of bench.serving's one epoch; written as <key>_trained")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    with bench_data_root(args.data_root, "towerflow-bench-realtime-") as root:
        result = {
            "benchmark": "realtime",
            "command": " ".join(["python", "-m", "bench.realtime", *map(shlex.quote, argv or sys.argv[1:])]),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "quick": args.quick,
        }
        if not args.only_value:
            result |= {"world": prepare(root, args.quick)["world"], "recompute": measure_recompute(root),
                       "http": measure_http(root, args.rps, args.seconds, args.ingest_rate)}
        key = ("value" if args.slate == 1 else f"value_slate{args.slate}") + ("_trained" if args.trained else "")
        if args.value or args.only_value:
            result[key] = measure_value(root / key.replace("_", "-"), args.quick, args.slate, args.trained)
    kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.only_value:  # keep the load sections and the other value sections of the last runs beside it
        # the file's code and machine are the load sections' run's: this section records its own
        result = {**result, **kept, key: result[key], f"{key}_command": result["command"],
                  f"{key}_when": result["when"], f"{key}_code": code_version(), f"{key}_machine": machine_info()}
    else:  # keep the value sections (and their commands) this run did not make
        made = {key, f"{key}_command", f"{key}_when", f"{key}_code", f"{key}_machine"} if args.value else set()
        result |= {k: v for k, v in kept.items() if k.startswith("value") and k not in result and k not in made}
    print(report(result))
    write_result(args.out.stem, result, result["command"], results_dir=args.out.parent)
    return result


if __name__ == "__main__":
    main()
