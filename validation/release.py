"""Release gate: answer sample queries through the release exactly as serving will, before the alias flips.

``answer_fn`` is the real path (registry load + history lookup + combine + FAISS search); this module only calls
it and checks the answers: every one names the expected release (the version handshake), has K distinct items,
and p99 latency stays under the bound. Requests and responses may be dicts or objects with the same field names:
a request may carry ``k``; a response carries ``release`` (an id, or an object with ``release_id``/``id``) and
``items`` (each with ``item_id``).

In a retrain the samples are holdout examples spread evenly over the holdout (``holdout_samples``), answered one
at a time on one torch thread, as a serving worker answers them (``gate_release_on_holdout``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from towerflow.config import GateConfig
from towerflow.models.batch import Batch
from towerflow.tasks.build_examples import SequenceExamples
from towerflow.validation.result import MAX_EXAMPLES, Check, GateResult


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def release_of(response: Any) -> str | None:
    """The release id a response names, whether given as a plain id or as a release object."""
    rel = _field(response, "release")
    if rel is None:
        rel = _field(response, "release_id")
    if rel is not None and not isinstance(rel, str | int):
        rel = _field(rel, "release_id") or _field(rel, "id")
    return None if rel is None else str(rel)


def check_release(
    answer_fn: Callable[[Any], Any],
    samples: Sequence[Any],
    expected_release_id: str,
    config: GateConfig,
    k: int | None = None,
    warmup: int = 1,
) -> GateResult:
    """Call ``answer_fn`` on every sample request and check the answers.

    ``k``: items expected per answer (default: each request's own ``k``). The first ``warmup`` answers are checked
    but not timed (lazy loading and caches are not what p99 should measure). An exception from ``answer_fn`` is a
    failed answer, not a crash of the gate.
    """
    errors: list[str] = []
    wrong_release: list[str | None] = []
    wrong_k: list[dict] = []
    latencies: list[float] = []  # ms
    for i, sample in enumerate(samples):
        t0 = time.perf_counter()
        try:
            response = answer_fn(sample)
        except Exception as exc:  # noqa: BLE001 - whatever serving raises is a failed answer to report
            errors.append(f"sample {i}: {type(exc).__name__}: {exc}")
            continue
        ms = (time.perf_counter() - t0) * 1000
        if i >= warmup or len(samples) <= warmup:
            latencies.append(ms)
        rel = release_of(response)
        if rel != str(expected_release_id):
            wrong_release.append(rel)
        want = k if k is not None else _field(sample, "k")
        items = list(_field(response, "items") or [])
        distinct = len({_field(it, "item_id") for it in items})
        if (want is not None and len(items) != want) or distinct != len(items):
            wrong_k.append({"sample": i, "items": len(items), "distinct": distinct, "expected": want})

    n = len(samples)
    answered = n - len(errors)
    checks = [
        Check("samples", n > 0, n, 1, f"{n} sample queries"),
        Check("answers", not errors, len(errors), 0, f"{len(errors)} of {n} queries raised", errors[:MAX_EXAMPLES]),
        Check("release id", not wrong_release, len(wrong_release), 0,
              f"{len(wrong_release)} of {answered} answers named another release than {expected_release_id}",
              sorted({str(r) for r in wrong_release})[:MAX_EXAMPLES]),
        Check("k items", not wrong_k, len(wrong_k), 0,
              f"{len(wrong_k)} of {answered} answers without the expected number of distinct items", wrong_k[:MAX_EXAMPLES]),
    ]
    if latencies:
        lat = np.asarray(latencies)
        p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        checks.append(Check("p99 latency ms", p99 <= config.max_release_latency_ms, p99, config.max_release_latency_ms,
                            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lat.max():.2f} ms over {len(lat)} timed queries"))
    else:
        checks.append(Check("p99 latency ms", False, None, config.max_release_latency_ms, "no query was answered"))
    return GateResult("release", checks)


def holdout_samples(n_rows: int, n_items: int, n: int = 50, k: int = 10) -> list[dict[str, int]]:
    """The release gate's requests: ``min(n, n_rows)`` holdout rows spread evenly from the first to the last (not
    just the first users), each asking for ``min(k, n_items)`` items -> [{"row", "k"}]."""
    rows = np.unique(np.linspace(0, n_rows - 1, min(n, n_rows)).round().astype(np.int64)) if n_rows else []
    return [{"row": int(r), "k": min(k, n_items)} for r in rows]


def gate_release_on_holdout(answer_batch: Callable[[Batch, int], Any], holdout: SequenceExamples,
                            user_feats: np.ndarray, release_id: str, n_items: int, config: GateConfig,
                            n: int = 50, k: int = 10) -> GateResult:
    """``check_release`` on ``holdout_samples``: each sample row becomes a one-request ``Batch`` that
    ``answer_batch(batch, k)`` answers with one response (serving's ``answer`` on the loaded release)."""

    def answer_one(sample: dict[str, int]) -> Any:
        return answer_batch(holdout.to_batch(np.array([sample["row"]]), user_feats), sample["k"])

    # one request at a time is tiny work: intra-op threads only add hand-off cost (and spin on a busy box);
    # serving workers run single-threaded for the same reason
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return check_release(answer_one, holdout_samples(len(holdout), n_items, n, k), release_id, config)
    finally:
        torch.set_num_threads(threads)
