"""Benchmark: MovieLens-100K through the path a user runs (the CLI and HTTP only, default settings, no config file).

    make data-ml100k            # once: fetches ML-100K (inside the recbole wheel on PyPI, sha256-verified)
    python -m bench.public_path [--ratings] [--sasrec] [--data downloads/ml-100k] [--work DIR]

The protocol, exactly:

1. Each user's last interaction (by timestamp; ties keep the file's row order, as RecBole's stable sort does: 415
   of ML-100K's 943 users rated several movies in their last second) is withheld as that user's test target.
2. The rest is written as a plain ``user,item,timestamp`` CSV and imported into a fresh data root with
   ``towerflow data import interactions`` (implicit feedback: every row a click); with ``--ratings`` the same rows,
   ratings kept, are also imported with ``towerflow data import movielens`` (explicit feedback) into another root.
3. ``towerflow retrain --lookback-days all --json`` (the window ends at the source's horizon, the day after its last
   event; every model setting is the default), then ``towerflow serve`` in a subprocess on a free loopback port,
   then ``POST /retrieve {"user_id": u, "k": 10}`` for every withheld user: the service's own clock (the end of
   the data), the homefeed surface, seen items excluded (the request's defaults).
4. HR@10 and NDCG@10 of the withheld item, each with its standard error sd/sqrt(n) over users.

Baselines on the same split, from ``tasks/evaluate.py`` (fitted on everything but the withheld items, ranked over
all items with seen items excluded): popularity and item co-occurrence, on ``build_examples``' leave-one-out of the
whole file with each withheld row moved one second later (``last_after_ties``; checked to hold out exactly it).
``--sasrec`` adds RecBole 1.2.1's SASRec (``make peer-recbole``; about 20+ minutes on 2 cores) on the same examples,
trained and ranked as in ``bench/movielens.py``; its result
depends only on the split, so it is also written to ``bench/results/public_path_sasrec.json`` and a later run
without ``--sasrec`` shows that row when the split's digest matches (the table says which file it came from).

"Internal holdout vs served": the release's own holdout metric (``towerflow retrain --json``: ``metrics``) beside
the same users' withheld items scored through ``/retrieve``, and whether the two differ by less than one standard
error of the served figure. The holdout users are read from the examples the retrain wrote under its data root.

Prints a table and writes ``bench/results/public_path.json`` (commit, machine, load average, date, every figure and
the exact commands run).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import RESULTS_DIR, code_version, command_line, print_table, write_result

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "downloads" / "ml-100k"  # what `make data-ml100k` extracts (RecBole atomic files)
TOWERFLOW = Path(sys.executable).parent / "towerflow"
K = 10
SASREC_RESULT = RESULTS_DIR / "public_path_sasrec.json"


# ------------------------------------------------------------------------------------------------- pure parts


def leave_last_out(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``user,item,timestamp[,...]`` rows into (rest, withheld): each user's last row by timestamp is withheld.

    Ties on the timestamp keep the file's row order (the later row is the last), as RecBole's stable sort does. A
    user with one row keeps it (no history to predict from). ``rest`` keeps the input's row order and a fresh
    index; ``withheld`` has one row per user, sorted by user, with the input's index labels.
    """
    order = df.sort_values(["user", "timestamp"], kind="stable")
    counts = order.groupby("user")["item"].transform("size")
    last = ~order["user"].duplicated(keep="last") & (counts > 1)
    withheld = order[last].sort_values("user", kind="stable")
    rest = df.loc[~df.index.isin(withheld.index)].reset_index(drop=True)
    return rest, withheld


def last_after_ties(df: pd.DataFrame, withheld: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each withheld row one second later, so it is its user's only last event.

    The importer orders a user's events of the same second by item id; the baselines' examples are cut by
    ``build_examples``' leave-one-out from the imported whole file, whose holdout must be the withheld row. One
    second changes nothing the baselines use (popularity counts, co-occurring items, SASRec's item order).
    """
    out = df.copy()
    out.loc[withheld.index, "timestamp"] += 1
    return out


def rank_of(target: int, items: list[int]) -> int | None:
    """1-based position of ``target`` in a returned list, None when it is not there."""
    try:
        return items.index(target) + 1
    except ValueError:
        return None


def hit_ndcg(ranks: list[int | None] | np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Per user: hit@k (1 if rank <= k) and ndcg@k (1/log2(rank + 1) if rank <= k, else 0); None = not retrieved."""
    r = np.array([np.inf if x is None else x for x in ranks], dtype=np.float64)
    hit = r <= k
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(np.where(hit, r, 1.0) + 1.0), 0.0)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error sd/sqrt(n) (sample sd, ddof 1); NaN for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def figures(ranks) -> dict[str, float]:
    """{"hr@10", "hr@10_se", "ndcg@10", "ndcg@10_se", "n"} of per-user ranks."""
    hit, ndcg = hit_ndcg(ranks)
    (h, hs), (g, gs) = mean_se(hit), mean_se(ndcg)
    return {f"hr@{K}": h, f"hr@{K}_se": hs, f"ndcg@{K}": g, f"ndcg@{K}_se": gs, "n": len(hit)}


def json_tail(stdout: str) -> dict:
    """The JSON object a ``--json`` command printed last (anything printed before it is skipped)."""
    starts = [0] if stdout.startswith("{") else []
    starts += [i + 1 for i in range(len(stdout)) if stdout.startswith("\n{", i)]
    for s in reversed(starts):
        try:
            return json.loads(stdout[s:])
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON object in the command's output: {stdout[-500:]!r}")


def split_digest(rest: pd.DataFrame, withheld: pd.DataFrame) -> str:
    """sha256 of the split (what a cached SASRec row must match)."""
    h = hashlib.sha256()
    for df in (rest, withheld):
        h.update(df[["user", "item", "timestamp"]].to_csv(index=False).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ the protocol


class Runner:
    """Runs ``towerflow`` commands against one data root and records each command line."""

    def __init__(self, root: Path, log: Path):
        self.root, self.log, self.commands = root, log, []
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("TOWERFLOW_", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
        self.env |= {"TOWERFLOW_DATA_ROOT": str(root), "PREFECT_HOME": str(root / "prefect"),
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

    def shown(self, args: list[str]) -> str:
        return f"TOWERFLOW_DATA_ROOT={self.root.name} towerflow " + " ".join(args)

    def run(self, args: list[str], timeout_s: float = 4 * 3600) -> tuple[str, float]:
        """Run ``towerflow *args``; return its stdout and wall time. Its stderr goes to the log file."""
        self.commands.append(self.shown(args))
        print(f"$ {self.shown(args)}", flush=True)
        t0 = time.perf_counter()
        with open(self.log, "a") as err:
            proc = subprocess.run([str(TOWERFLOW), *args], env=self.env, cwd=self.root.parent, stdout=subprocess.PIPE,
                                  stderr=err, text=True, timeout=timeout_s, check=False)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = self.log.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"`{self.shown(args)}` exited {proc.returncode}: " + " | ".join(tail))
        return proc.stdout, seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"content-type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def serve_and_query(runner: Runner, users: np.ndarray, timeout_s: float = 600) -> tuple[dict, float, float]:
    """``towerflow serve`` on a free loopback port; ``POST /retrieve`` for each user (k=10, defaults otherwise).

    Returns ({user: response}, seconds until healthy, seconds for all requests). The server is stopped after.
    """
    port = free_port()
    args = ["serve", "--port", str(port)]
    runner.commands.append(runner.shown(args))
    print(f"$ {runner.shown(args)}", flush=True)
    t0 = time.perf_counter()
    with open(runner.log, "a") as log:
        proc = subprocess.Popen([str(TOWERFLOW), *args], env=runner.env, cwd=runner.root.parent,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"towerflow serve exited {proc.returncode}: see {runner.log}")
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"towerflow serve not healthy after {timeout_s:.0f}s: see {runner.log}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                if _get(conn, "GET", "/healthz")[0] == 200:
                    break
                conn.close()
            except OSError:
                pass
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = {}
        for u in users.tolist():
            status, body = _get(conn, "POST", "/retrieve", {"user_id": int(u), "k": K})
            if status != 200:
                raise RuntimeError(f"POST /retrieve user {u}: HTTP {status} {body}")
            out[int(u)] = body
        conn.close()
        return out, ready_s, time.perf_counter() - t1
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def holdout_users(root: Path) -> np.ndarray:
    """User ids of the holdout rows of the examples the retrain built under ``root`` (one retrain per root)."""
    from towerflow.tasks.build_examples import Examples

    dirs = sorted((root / "work" / "examples").glob("*/examples"))
    if len(dirs) != 1:
        raise RuntimeError(f"expected the examples of one retrain under {root / 'work' / 'examples'}, found {len(dirs)}")
    ex = Examples.load(dirs[0])
    return ex.vocab.user_ids[ex.holdout.user_idx - 1]


def run_towerflow(kind: str, source_args: list[str], root: Path, withheld: pd.DataFrame) -> dict:
    """Import, retrain, serve and score one feedback kind ("implicit" or "ratings") in a fresh data root."""
    root.mkdir(parents=True)
    runner = Runner(root, root.parent / f"{kind}.log")
    out: dict = {"kind": kind, "log": str(runner.log)}
    try:
        _, out["import_s"] = runner.run(source_args)
        stdout, out["retrain_s"] = runner.run(["retrain", "--lookback-days", "all", "--json"])
        result = json_tail(stdout)
        out["retrain"] = {k: result.get(k) for k in ("status", "release_id", "snapshot_id", "metrics", "comparison")}
        if result.get("status") not in ("promoted", "already_champion"):
            raise RuntimeError(f"retrain did not promote: {result.get('status')}")
        responses, out["serve_ready_s"], out["requests_s"] = serve_and_query(runner, withheld["user"].to_numpy())
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        out["error"] = str(exc)
        out["commands"] = runner.commands
        print(f"{kind}: {exc}", flush=True)
        return out
    out["commands"] = runner.commands
    targets = dict(zip(withheld["user"].tolist(), withheld["item"].tolist(), strict=True))
    ranks = {u: rank_of(targets[u], [i["item_id"] for i in r["items"]]) for u, r in responses.items()}
    out["served"] = figures(list(ranks.values()))
    if "rating" in withheld:  # the release's holdout targets are last POSITIVES (3+ stars); these are any rating
        positive = set(withheld.loc[withheld["rating"] >= 3, "user"].tolist())
        out["served_positive_targets"] = figures([r for u, r in ranks.items() if u in positive])
    out["paths"] = pd.Series([r["path"] for r in responses.values()]).value_counts().to_dict()
    out["releases_served"] = sorted({r["release"] for r in responses.values()})

    # internal holdout vs served: the release's holdout metric beside the same users' withheld items via /retrieve
    try:
        users = np.unique(holdout_users(root))
    except (RuntimeError, OSError, ValueError) as exc:
        out["internal_vs_served"] = {"error": f"holdout users not found: {exc}"}
        return out
    served_same = figures([ranks[u] for u in users.tolist() if u in ranks])
    internal = out["retrain"]["metrics"] or {}
    cmp = {"holdout_users": len(users), "served_same_users": served_same}
    for m in (f"hr@{K}", f"ndcg@{K}"):
        if m in internal:
            diff = internal[m] - served_same[m]
            cmp[m] = {"internal": internal[m], "served": served_same[m], "diff": diff, "se": served_same[f"{m}_se"],
                      "within_one_se": bool(abs(diff) < served_same[f"{m}_se"])}
    out["internal_vs_served"] = cmp
    return out


def baselines(full_csv: Path, withheld: pd.DataFrame, work: Path, sasrec: argparse.Namespace | None) -> dict:
    """Popularity and co-occurrence (tasks/evaluate.py), and SASRec when asked, on the split of ``withheld``.

    The whole file is imported with the library's importer and cut with ``build_examples``' leave-one-out, whose
    holdout must be exactly ``withheld`` (checked), so train data, targets and seen items are the benchmark's own.
    """
    from datetime import timedelta

    from towerflow.config import ExamplesConfig
    from towerflow.data.interactions import import_interactions
    from towerflow.data.source import ParquetSource
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.evaluate import baseline_ranks

    uri = str(work / "baseline-source")
    import_interactions(str(full_csv), uri)
    src = ParquetSource(uri)
    days = src.days()
    start = pd.Timestamp(days[0], tz="UTC").to_pydatetime()
    end = pd.Timestamp(days[-1], tz="UTC").to_pydatetime() + timedelta(days=1)
    events = src.read_events(start, end)
    ex = build_examples(events, src.read_users(), src.read_items(), end,
                        ExamplesConfig(split="leave_one_out", validation=False, max_holdout_users=None))
    users = ex.vocab.user_ids[ex.holdout.user_idx - 1]
    items = ex.vocab.item_ids[ex.holdout.target_items - 1]
    mine = np.isin(users, withheld["user"].to_numpy())  # build_examples also holds out a single-row user's row
    order = np.argsort(users[mine], kind="stable")
    got = pd.DataFrame({"user": users[mine][order], "item": items[mine][order]})
    if not got.equals(withheld[["user", "item"]].reset_index(drop=True).astype(got.dtypes.to_dict())):
        raise RuntimeError("build_examples' leave-one-out holdout is not the benchmark's withheld set")
    rows = {name: figures(r[mine]) for name, r in baseline_ranks(ex).items()}
    if sasrec is not None:
        from bench.movielens import sasrec_row

        peer = sasrec_row(events, ex, sasrec, batch_size=512)
        rows["sasrec"] = figures(peer.pop("ranks")[mine])
        rows["sasrec_details"] = {k: v for k, v in peer.items() if k != "row"}
    return rows


def _fmt(f: dict | None, m: str) -> str:
    if not f or m not in f:
        return "-"
    return f"{f[m]:.4f} ± {f[m + '_se']:.4f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ML-100K's RecBole atomic files (make data-ml100k)")
    p.add_argument("--ratings", action="store_true", help="also run with the ratings imported (import movielens)")
    p.add_argument("--no-implicit", action="store_true", help="skip the implicit CSV run (with --ratings)")
    p.add_argument("--sasrec", action="store_true", help="also train RecBole's SASRec (needs: make peer-recbole)")
    p.add_argument("--sasrec-epochs", type=int, default=30)
    p.add_argument("--work", type=Path, help="keep the data roots and logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    inter = args.data / "ml-100k.inter"
    if not inter.exists():
        raise SystemExit(f"{inter} not found: fetch MovieLens-100K first with `make data-ml100k`")
    if args.sasrec:
        from bench.peer import PEER_PYTHON

        if not PEER_PYTHON.exists():
            raise SystemExit(f"--sasrec needs the peer's own environment ({PEER_PYTHON}): make peer-recbole")

    # the commands below import the checkout as it is now; "code" in the JSON is read when the run ends
    code_at_start = code_version()
    raw = pd.read_csv(inter, sep="\t")
    raw.columns = [c.split(":")[0] for c in raw.columns]  # user_id:token -> user_id
    raw = raw.rename(columns={"user_id": "user", "item_id": "item"}).astype({"timestamp": "int64"})
    rest, withheld = leave_last_out(raw)
    digest = split_digest(rest, withheld)
    print(f"MovieLens-100K: {len(raw):,} ratings, {raw.user.nunique()} users, {raw.item.nunique():,} items; "
          f"withheld {len(withheld)} (each user's last), {len(rest):,} imported", flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="towerflow-public-path-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        train_csv, full_csv = work / "interactions.csv", work / "all.csv"
        rest[["user", "item", "timestamp"]].to_csv(train_csv, index=False)
        last_after_ties(raw, withheld)[["user", "item", "timestamp"]].to_csv(full_csv, index=False)
        runs = {}
        if not args.no_implicit:
            runs["implicit"] = run_towerflow("implicit", ["data", "import", "interactions", str(train_csv)],
                                             work / "implicit", withheld)
        if args.ratings:
            ml_dir = work / "ml-100k-rest"
            ml_dir.mkdir(exist_ok=True)
            keep = ~raw.index.isin(withheld.index)
            lines = inter.read_text().splitlines()
            (ml_dir / "ml-100k.inter").write_text("\n".join([lines[0], *np.array(lines[1:])[keep]]) + "\n")
            for ext in ("user", "item"):
                shutil.copy(args.data / f"ml-100k.{ext}", ml_dir / f"ml-100k.{ext}")
            runs["ratings"] = run_towerflow("ratings", ["data", "import", "movielens", str(ml_dir)],
                                            work / "ratings", withheld)
        sas_args = (argparse.Namespace(threads=1, sasrec_epochs=args.sasrec_epochs, patience=3, seq_len=32)
                    if args.sasrec else None)
        base = baselines(full_csv, withheld, work, sas_args)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    sasrec_from = None
    if args.sasrec:
        write_result("public_path_sasrec", {"split_sha256": digest, "sasrec": base["sasrec"],
                                            "details": base.pop("sasrec_details")},
                     command_line("bench.public_path", argv))
        sasrec_from = "this run"
    elif SASREC_RESULT.exists():
        cached = json.loads(SASREC_RESULT.read_text())
        if cached.get("split_sha256") == digest:
            base["sasrec"] = cached["sasrec"]
            sasrec_from = f"{SASREC_RESULT.relative_to(ROOT)} (commit {(cached['code']['commit'] or '?')[:7]})"

    table = []
    for kind, label in (("implicit", "towerflow, implicit CSV (import interactions)"),
                        ("ratings", "towerflow, ratings (import movielens)")):
        if kind in runs:
            r = runs[kind]
            table.append({"model": label, "hr": _fmt(r.get("served"), f"hr@{K}"),
                          "ndcg": _fmt(r.get("served"), f"ndcg@{K}"), "train": r.get("retrain_s"),
                          "note": r.get("error", r.get("retrain", {}).get("status"))})
    for key, label in (("popularity", "popularity"), ("cooccurrence", "item-item co-occurrence"),
                       ("sasrec", "SASRec (RecBole 1.2.1)")):
        if key in base:
            table.append({"model": label, "hr": _fmt(base[key], f"hr@{K}"), "ndcg": _fmt(base[key], f"ndcg@{K}"),
                          "note": f"from {sasrec_from}" if key == "sasrec" else ""})
    print_table(table, [("model", "model", ""), (f"HR@{K} ± se", "hr", ""), (f"NDCG@{K} ± se", "ndcg", ""),
                        ("retrain s", "train", ".0f"), ("", "note", "")],
                title=f"MovieLens-100K, each user's last interaction withheld ({len(withheld)} users), "
                      f"served through POST /retrieve at the serving clock, seen excluded, k={K}")
    for kind, r in runs.items():
        if "served_positive_targets" in r:
            f = r["served_positive_targets"]
            print(f"{kind}: served, the {f['n']} users whose withheld rating is 3+ stars: HR@{K} {_fmt(f, f'hr@{K}')}, "
                  f"NDCG@{K} {_fmt(f, f'ndcg@{K}')}")
        c = r.get("internal_vs_served")
        if c and "error" in c:
            print(f"{kind}: internal holdout vs served: {c['error']}")
        elif c:
            parts = [f"{m} internal {v['internal']:.4f} vs served {v['served']:.4f} (diff {v['diff']:+.4f}, "
                     f"se {v['se']:.4f}: {'within' if v['within_one_se'] else 'NOT within'} one se)"
                     for m, v in c.items() if isinstance(v, dict) and "internal" in v]
            print(f"{kind}: internal holdout vs served, {c['holdout_users']} holdout users: " + "; ".join(parts))
    out = {"split": {"ratings": len(raw), "users": int(raw.user.nunique()), "items": int(raw.item.nunique()),
                     "withheld": len(withheld), "imported": len(rest), "split_sha256": digest,
                     "ties": "last by timestamp, ties keep the file's row order"},
           "code_at_start": code_at_start, "k": K, "runs": runs, "baselines": base, "sasrec_from": sasrec_from, "table": table,
           "commands": [c for r in runs.values() for c in r.get("commands", [])]}
    write_result("public_path", out, command_line("bench.public_path", argv))
    return out


if __name__ == "__main__":
    main()
