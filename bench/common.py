"""What every benchmark shares: the machine it ran on, peak memory, one fresh process per measurement, a plain
table, the JSON result under ``bench/results/<name>.json``, and the machine's own dense matmul rate (the yardstick
for compute efficiency).

Nothing here runs at import; heavy libraries (torch) are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (header, key in the row dict, format spec); a missing key prints as "-"
Column = tuple[str, str, str]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_in_child(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` in a fresh spawned process, so its peak RSS and its imports are its own.

    ``fn`` must be a module-level function (it is pickled by name); its return value must pickle.
    """
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, kwds=kwargs)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """The machine a figure came from: cores usable by this process, CPU model, memory, Python and torch."""
    import torch

    return {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # other work on the machine inflates every timing: record how busy it was when the result was written
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def matmul_gflops(n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's fp32 dense matmul rate (GFLOP/s) for (n, n) @ (n, n) with torch's current thread count.

    The best of repeated timings over about ``seconds``: the rate the hardware reaches when nothing else waits.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: first call allocates and picks kernels
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Right-aligned plain-text table; one line per row."""

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, fmt) if fmt else str(value)

    cells = [[cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str = "") -> None:
    print(f"\n{title}" if title else "")
    print(format_table(rows, columns))


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run: ``python -m bench.x --flag ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def code_version() -> dict[str, Any]:
    """The commit the figures came from, and whether tracked files differed from it (``dirty``)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def write_result(name: str, result: dict[str, Any], command: str, results_dir: Path | None = None) -> Path:
    """Write ``{"benchmark", "command", "when", "code", "machine", **result}`` to ``<results_dir>/<name>.json``."""
    path = (results_dir or RESULTS_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": command, "when": datetime.now(UTC).isoformat(timespec="seconds"),
           "code": code_version(), "machine": machine_info(), **result}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path


@contextmanager
def bench_data_root(data_root: Path | None, prefix: str) -> Iterator[Path]:
    """The data root a service benchmark works in (a temporary directory, removed afterwards, unless one is given),
    with Prefect's home under it, flows on its ephemeral API, and quiet logs and progress bars."""
    with nullcontext(str(data_root)) if data_root else tempfile.TemporaryDirectory(prefix=prefix) as d:
        root = Path(d).resolve()
        root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))  # nothing in the user's home
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ["TOWERFLOW_DATA_ROOT"] = str(root)
        yield root
