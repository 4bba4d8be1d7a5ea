"""Benchmark: hybrid vs full online retrieval latency over HTTP, and a load test across a promotion.

    python -m bench.serving [--concurrency 8] [--requests 2000] [--quick] [--data-root DIR]
    python -m bench.serving --floor [--items 5000 100000] [--levels 1 8 32 128]   (bench/serving_floor.py)
    python -m bench.serving --query-latency [--pairs 2000]                   (bench/serving_query.py)

Setup (skipped when ``--data-root`` already holds it): a synthetic world; two releases from the real retrain flow
(version 1 registered only, version 2 the champion); user states refreshed for both (a candidate's states are
computed before it is promoted, so the hybrid path stays warm across the swap).

1. Latency: ``towerflow serve`` in a subprocess on 127.0.0.1, once with ``--mode hybrid`` (stored h + combine) and
   once with ``--mode online`` (encode every history per request); the same ``--requests`` requests from
   ``--concurrency`` concurrent clients; client-side p50/p99 and their ratio. The same paths are also timed
   in-process (no HTTP), one request at a time.
2. Promotion under load: clients keep sending requests while version 1 is promoted; the server's watcher loads it
   beside the old one and swaps. Counted: errors, responses whose items differ from what the release they name
   answers (the tower or index of another release would show here), p99 during the swap window (from the
   promotion until 1 s after the first response from the new release). The champion is rolled back after.

Prints a table and writes ``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_data_root, command_line, write_result

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
READY = "bench-ready.json"


def _world(quick: bool):
    from towerflow.config import WorldConfig

    if quick:
        return WorldConfig(n_users=300, n_items=400, n_topics=6, days=4, events_per_day=3_000, seed=3)
    return WorldConfig(n_users=3_000, n_items=5_000, n_topics=20, days=8, events_per_day=25_000, seed=3)


def _retrain_config(quick: bool, seed: int, promote: bool):
    from towerflow.config import ExamplesConfig, GateConfig, ModelConfig, RetrainConfig, TrainConfig

    model = ModelConfig(dim=16, d_model=16, hidden=32, n_layers=1) if quick else ModelConfig()  # default: 64-d, 2 layers
    return RetrainConfig(
        examples=ExamplesConfig(max_seq_len=8 if quick else 32),
        train=TrainConfig(model=model, epochs=1, batch_size=512, seed=seed),
        gates=GateConfig(min_lift_over_popularity=-1.0, max_regression=1.0),  # the bench measures serving
        promote=promote,
    )


def prepare(root: Path, quick: bool) -> dict[str, Any]:
    """World, two releases, states for both; returns (and caches in <root>/bench-ready.json) what they are."""
    if (root / READY).is_file():
        return json.loads((root / READY).read_text())
    from towerflow.data.synthetic import generate_world
    from towerflow.flows.refresh_user_states import refresh_user_states
    from towerflow.flows.retrain import retrain

    world = _world(quick)
    generate_world(str(root / "source"), world)
    as_of = world.start + timedelta(days=world.days)
    lookback = min(7, world.days)
    t0 = time.perf_counter()
    candidate = retrain(as_of=as_of, lookback_days=lookback, config=_retrain_config(quick, 1, promote=False))
    champion = retrain(as_of=as_of, lookback_days=lookback, config=_retrain_config(quick, 0, promote=True))
    train_s = time.perf_counter() - t0
    refreshed = [refresh_user_states(release=r.release_id, lookback_days=7).model_dump(mode="json")
                 for r in (candidate, champion)]
    info = {"world": world.model_dump(mode="json"), "as_of": as_of.isoformat(), "retrain_s": round(train_s, 1),
            "champion": {"release": champion.release_id, "version": int(champion.model_version)},
            "candidate": {"release": candidate.release_id, "version": int(candidate.model_version)},
            "refresh": refreshed}
    (root / READY).write_text(json.dumps(info, indent=2))
    return info


def _requests(root: Path, n: int, seed: int = 0) -> list[dict]:
    """n requests over users with a state: a third homefeed, a third related (context item), a third search."""
    from towerflow.config import Settings
    from towerflow.data.source import ParquetSource
    from towerflow.serving.state_store import SQLiteUserStateStore

    settings = Settings(data_root=root)
    store = SQLiteUserStateStore(settings.user_states_path)
    users = sorted(int(u) for u in ParquetSource(settings.source).read_users()["user_id"])
    champion = json.loads((root / READY).read_text())["champion"]["release"]
    active = sorted(store.get(users, champion))
    from towerflow.infra.releases import load_release

    item_ids = load_release(settings).item_ids
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        req: dict[str, Any] = {"user_id": int(rng.choice(active)), "k": 10}
        if i % 3:
            req["context"] = {"item_id": int(rng.choice(item_ids)), "surface": ("related", "search")[i % 3 - 1]}
        out.append(req)
    return out


# ------------------------------------------------------------------------------------------------ server + load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``towerflow serve`` in a subprocess on loopback."""

    def __init__(self, root: Path, mode: str, poll_s: float = 1.0, extra: tuple[str, ...] = ()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TOWERFLOW_DATA_ROOT": str(root)}
        self.log = open(root / f"serve-{mode}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "towerflow.cli", "serve", "--port", str(self.port),
                                      "--mode", mode, "--poll-s", str(poll_s), "--log-level", "warning", *extra],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not healthy after {timeout}s; see {self.log.name}")

    def cpu_s(self, main_thread: bool = False) -> float:
        """CPU seconds (user + system) the server process has used so far; ``main_thread``: its event loop's only."""
        stat = f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat" if main_thread else f"/proc/{self.proc.pid}/stat"
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to POST JSON and read the answer.

    The load generator shares the 2 cores with the server; a full client library (httpx) costs several times the
    CPU of these few lines per request and would be what the benchmark measures.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes | None) -> tuple[int, bytes]:
        """POST ``body`` as JSON, or GET ``path`` when ``body`` is None -> (status, response body)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        if body is None:
            self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        else:
            self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _run_load(url: str, requests: list[dict], concurrency: int, duration_s: float | None = None,
                    on_tick=None) -> list[dict]:
    """``concurrency`` clients send ``requests`` in order (each request once) or cycle them for ``duration_s``.

    Returns one record per response: start and end (monotonic), status, release, items, request index.
    """
    host, port = url.rsplit("//", 1)[1].split(":")
    bodies = [json.dumps(r).encode() for r in requests]
    records: list[dict] = []
    nxt = 0
    t_start = time.monotonic()

    async def client() -> None:
        nonlocal nxt
        conn = _Connection(host, int(port))
        try:
            while True:
                if duration_s is None and nxt >= len(requests):
                    return
                if duration_s is not None and time.monotonic() - t_start >= duration_s:
                    return
                i = nxt
                nxt += 1
                t0 = time.monotonic()
                try:
                    status, raw = await conn.post("/retrieve", bodies[i % len(requests)])
                    body = json.loads(raw) if status == 200 else {}
                    rec = {"status": status, "release": body.get("release"),
                           "items": [x["item_id"] for x in body.get("items", [])], "path": body.get("path")}
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    rec = {"status": -1, "release": None, "items": [], "error": repr(exc)}
                    await conn.close()
                    conn = _Connection(host, int(port))
                records.append({**rec, "start": t0, "end": time.monotonic(), "req": i % len(requests)})
        finally:
            await conn.close()

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    if on_tick is not None:
        tasks.append(asyncio.create_task(on_tick()))
    await asyncio.gather(*tasks)
    return records


def _ms(records: list[dict]) -> np.ndarray:
    return np.array([(r["end"] - r["start"]) * 1e3 for r in records])


def _pct(lat: np.ndarray) -> dict[str, float | int]:
    if len(lat) == 0:
        return {"n": 0}
    return {"n": int(len(lat)), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2)}


def measure_latency(root: Path, requests: list[dict], concurrency: int) -> dict[str, Any]:
    out = {}
    for mode in ("hybrid", "online"):
        server = Server(root, mode)
        try:
            server.wait_ready()
            asyncio.run(_run_load(server.url, requests[:200], concurrency))  # warm-up
            t0, cpu0, load0 = time.monotonic(), server.cpu_s(), os.getloadavg()[0]
            recs = asyncio.run(_run_load(server.url, requests, concurrency))
            wall, cpu = time.monotonic() - t0, server.cpu_s() - cpu0
            load = round((load0 + os.getloadavg()[0]) / 2, 1)
        finally:
            server.stop()
        errors = sum(r["status"] != 200 for r in recs)
        paths = {p: sum(r.get("path") == p for r in recs) for p in ("state", "online", "context", "popularity")}
        out[mode] = {**_pct(_ms(recs)), "errors": errors, "throughput_rps": round(len(recs) / wall, 1),
                     "server_cpu_ms_per_request": round(cpu / len(recs) * 1e3, 2), "load_average": load,
                     "paths": {p: n for p, n in paths.items() if n}}
    for key in ("p50_ms", "p99_ms", "server_cpu_ms_per_request"):
        out[f"{key}_ratio_online_over_hybrid"] = round(out["online"][key] / out["hybrid"][key], 2)
    return out


def measure_in_process(root: Path, requests: list[dict], n: int = 500) -> dict[str, Any]:
    """The two paths without HTTP, one request at a time, in this process (torch on 1 thread, as served)."""
    import torch

    from towerflow.config import Settings
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    torch.set_num_threads(1)
    out = {}
    for mode in ("hybrid", "online"):
        svc = RetrievalService(Settings(data_root=root), ServingConfig(mode=mode)).start(watch=False)
        lat = []
        for req in requests[:n]:
            ctx = req.get("context", {})
            t0 = time.perf_counter()
            svc.retrieve(req["user_id"], ctx.get("item_id"), ctx.get("surface", "homefeed"), req["k"])
            lat.append((time.perf_counter() - t0) * 1e3)
        svc.close()
        out[mode] = _pct(np.array(lat))
    out["p50_ms_ratio_online_over_hybrid"] = round(out["online"]["p50_ms"] / out["hybrid"]["p50_ms"], 2)
    return out


def _expected(url: str, requests: list[dict]) -> tuple[str, list[list[int]]]:
    """Each request's answer from the server, one at a time: (release, items per request)."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as c:
        bodies = [c.post("/retrieve", json=r).json() for r in requests]
    releases = {b["release"] for b in bodies}
    if len(releases) != 1:
        raise RuntimeError(f"the server answered from several releases while idle: {releases}")
    return releases.pop(), [[x["item_id"] for x in b["items"]] for b in bodies]


def measure_swap(root: Path, info: dict, requests: list[dict], concurrency: int, duration_s: float,
                 promote_after_s: float) -> dict[str, Any]:
    from towerflow.config import Settings
    from towerflow.infra.promote import promote, rollback

    settings = Settings(data_root=root)
    distinct = requests[:300]
    server = Server(root, "hybrid", poll_s=0.5)
    promoted_at: list[float] = []
    try:
        server.wait_ready()
        old_release, old_items = _expected(server.url, distinct)

        async def promote_later() -> None:
            await asyncio.sleep(promote_after_s)
            promoted_at.append(time.monotonic())
            # in a thread: the promotion (registry calls, artifact verification) must not stall the clients' loop
            await asyncio.to_thread(promote, info["candidate"]["version"], settings)

        load0 = os.getloadavg()[0]
        recs = asyncio.run(_run_load(server.url, distinct, concurrency, duration_s, promote_later))
        load = round((load0 + os.getloadavg()[0]) / 2, 1)
        new_release, new_items = _expected(server.url, distinct)
    finally:
        server.stop()
        rollback(settings)
    expected = {old_release: old_items, new_release: new_items}
    errors = [r for r in recs if r["status"] != 200]
    mismatched = [r for r in recs if r["status"] == 200 and (
        r["release"] not in expected or r["items"] != expected[r["release"]][r["req"]])]
    t_p = promoted_at[0]
    first_new = min((r["end"] for r in recs if r["release"] == new_release), default=None)
    window_end = (first_new or t_p) + 1.0
    during = [r for r in recs if r["end"] >= t_p and r["start"] <= window_end]
    before = [r for r in recs if r["end"] < t_p]
    after = [r for r in recs if r["start"] > window_end]
    return {
        "old_release": old_release, "new_release": new_release, "requests": len(recs),
        "errors": len(errors), "mismatched_release": len(mismatched),
        "answered_by_new": sum(r["release"] == new_release for r in recs),
        "swap_seen_after_s": round(first_new - t_p, 2) if first_new else None,
        "before": _pct(_ms(before)), "during_swap": _pct(_ms(during)), "after": _pct(_ms(after)),
        "overall": _pct(_ms(recs)), "load_average": load,
        "examples_of_errors": [r.get("error") or r["status"] for r in errors[:3]],
    }


# ------------------------------------------------------------------------------------------------ report


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def _row(name: str, m: dict) -> tuple[str, ...]:
    def f(key: str) -> str:
        v = m.get(key)
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    return (name, f("n"), f("p50_ms"), f("p99_ms"), f("max_ms"), f("errors"), f("throughput_rps"),
            f("server_cpu_ms_per_request"), f("load_average"))


def report(result: dict) -> str:
    lat, inproc, swap = result["latency"], result["in_process"], result["swap"]
    head = ("", "requests", "p50 ms", "p99 ms", "max ms", "errors", "req/s", "server CPU ms/req", "load avg")
    lines = [f"HTTP on 127.0.0.1, {result['concurrency']} concurrent clients, {result['cpus']} CPUs",
             _table([head, _row("hybrid (stored h)", lat["hybrid"]), _row("online (encode h)", lat["online"])]),
             f"online / hybrid: p50 x{lat['p50_ms_ratio_online_over_hybrid']}, "
             f"p99 x{lat['p99_ms_ratio_online_over_hybrid']}, "
             f"server CPU per request x{lat['server_cpu_ms_per_request_ratio_online_over_hybrid']}",
             "", "in process, one request at a time (no HTTP)",
             _table([head, _row("hybrid", inproc["hybrid"]), _row("online", inproc["online"])]),
             f"online / hybrid: p50 x{inproc['p50_ms_ratio_online_over_hybrid']}",
             "", f"promotion under load: {swap['old_release']} -> {swap['new_release']}, "
                 f"{swap['requests']} requests, {swap['errors']} errors, "
                 f"{swap['mismatched_release']} responses not matching the release they name, "
                 f"new release answering {swap['swap_seen_after_s']} s after the promotion",
             _table([head, _row("before", swap["before"]), _row("during swap", swap["during_swap"]),
                     _row("after", swap["after"])])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000, help="requests per latency run (default 2000)")
    p.add_argument("--swap-seconds", type=float, default=12.0, help="length of the promotion load test")
    p.add_argument("--quick", action="store_true", help="a tiny world and model (a smoke run, not the figures)")
    p.add_argument("--data-root", type=Path, help="reuse (or prepare) the world here instead of a temp dir")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--floor", action="store_true", help="instead: /retrieve against the service's own /healthz at "
                                                        "each --levels, for each --items (bench/serving_floor.py)")
    p.add_argument("--items", type=int, nargs="+", default=[5_000, 100_000], help="--floor: catalog sizes")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128], help="--floor: concurrent clients")
    p.add_argument("--seconds", type=float, default=4.0, help="--floor: seconds per endpoint and level")
    p.add_argument("--serve-args", default="", help="--floor: extra 'towerflow serve' options, one string")
    p.add_argument("--query-latency", action="store_true", help="instead: in process, /retrieve on search with a "
                                                                "query against without (bench/serving_query.py)")
    p.add_argument("--pairs", type=int, default=2000, help="--query-latency: request pairs")
    args = p.parse_args(argv)
    if args.floor:
        return _floor(args, argv)
    if args.query_latency:
        return _query_latency(args, argv)

    with bench_data_root(args.data_root, "towerflow-bench-serving-") as root:
        t0 = time.perf_counter()
        info = prepare(root, args.quick)
        print(f"setup: {time.perf_counter() - t0:.0f}s (champion {info['champion']['release']}, candidate "
              f"{info['candidate']['release']})", flush=True)
        requests = _requests(root, args.requests)
        result = {
            "cpus": len(os.sched_getaffinity(0)),
            "concurrency": args.concurrency, "quick": args.quick, "setup": info,
            "latency": measure_latency(root, requests, args.concurrency),
            "in_process": measure_in_process(root, requests),
            "swap": measure_swap(root, info, requests, args.concurrency, args.swap_seconds,
                                 promote_after_s=args.swap_seconds / 3),
        }
    print()
    print(report(result))
    # the commit and machine the figures came from, as every other benchmark's JSON has them
    write_result(args.out.stem, result, command_line("bench.serving", argv), results_dir=args.out.parent)
    return result


def _floor(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from bench import serving_floor

    with bench_data_root(args.data_root, "towerflow-bench-floor-") as root:
        result = serving_floor.run(root, args.items, args.levels, args.seconds, tuple(shlex.split(args.serve_args)))
    print(serving_floor.report(result))
    out = args.out if args.out != RESULTS else RESULTS.with_name("serving_floor.json")
    write_result(out.stem, result, command_line("bench.serving", argv), results_dir=out.parent)
    return result


def _query_latency(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from bench import serving_query

    with bench_data_root(args.data_root, "towerflow-bench-query-") as root:
        result = serving_query.run(root, args.pairs)
    print(serving_query.report(result))
    out = args.out if args.out != RESULTS else RESULTS.with_name("serving_query.json")
    write_result(out.stem, result, command_line("bench.serving", argv), results_dir=out.parent)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
