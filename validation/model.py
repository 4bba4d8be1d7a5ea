"""Model gate: the candidate against the champion and the baselines, all scored on the same holdout.

Metric dicts map names as the evaluator writes them (``"recall@10"``, ``"ndcg@10"``) to values in [0, 1].

- Blocking: ``config.metric`` and each of ``config.secondary_metrics`` may not fall below the champion's by more
  than ``config.max_regression`` (absolute). With no champion (the first release) these checks pass and say that
  the candidate was judged against baselines only.
- Blocking: ``config.metric`` must beat ``baselines[config.lift_baseline]`` (popularity) by more than
  ``config.min_lift_over_popularity`` (absolute).
- Non-blocking (warnings): the other baselines, and every slice (e.g. per surface), so a regression on one
  surface is visible in the report without vetoing a model that is better overall.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from towerflow.config import GateConfig
from towerflow.validation.result import Check, GateResult

Metrics = Mapping[str, float]


def _value(metrics: Metrics | None, name: str) -> float | None:
    """The metric as a finite float, or None when it is absent or NaN/inf."""
    if metrics is None or name not in metrics:
        return None
    v = float(metrics[name])
    return v if math.isfinite(v) else None


def _vs_champion(name: str, cand: float | None, champ: float | None, tol: float, blocking: bool = True) -> Check:
    if cand is None:
        return Check(name, False, detail="candidate has no finite value", blocking=blocking)
    if champ is None:
        return Check(name, False, cand, detail="champion has no finite value: evaluate it on this holdout",
                     blocking=blocking)
    delta = cand - champ
    return Check(name, delta >= -tol - 1e-12, cand, champ - tol,
                 f"candidate {cand:.4f} vs champion {champ:.4f} ({delta:+.4f}; allowed -{tol:g})", blocking=blocking)


def _vs_baseline(name: str, cand: float | None, base: float | None, baseline: str, margin: float,
                 blocking: bool = True) -> Check:
    if cand is None:
        return Check(name, False, detail="candidate has no finite value", blocking=blocking)
    if base is None:
        return Check(name, False, cand, detail=f"no {baseline} baseline value to compare with", blocking=blocking)
    lift = cand - base
    return Check(name, lift > margin, cand, base + margin,
                 f"candidate {cand:.4f} vs {baseline} {base:.4f} (lift {lift:+.4f}; must exceed {margin:+g})",
                 blocking=blocking)


def _metric_table(candidate: Metrics, champion: Metrics | None, baselines: Mapping[str, Metrics],
                  slices: Mapping[str, Mapping[str, Metrics]]) -> str:
    """Markdown: rows = metrics (overall, then per slice), columns = candidate, champion, each baseline."""
    models = ["candidate", "champion", *baselines]
    overall = {"candidate": candidate, "champion": champion or {}, **baselines}
    rows = [("overall", overall)] + [(f"slice {s}", by_model) for s, by_model in slices.items()]
    out = ["| slice | metric | " + " | ".join(models) + " |", "|" + " --- |" * (len(models) + 2)]
    for label, by_model in rows:
        names = sorted({m for metrics in by_model.values() for m in (metrics or {})})
        for m in names:
            cells = [_fmt(_value(by_model.get(model), m)) for model in models]
            out.append(f"| {label} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if v > 1 and v == int(v) else f"{v:.4f}"  # counts such as "n" read as counts


def slices_by_name(
    candidate: Mapping[str, Metrics],
    champion: Mapping[str, Metrics] | None,
    baselines: Mapping[str, Mapping[str, Metrics]],
    overall: str = "all",
) -> dict[str, dict[str, Metrics]]:
    """Turn per-model slice metrics (``{slice: metrics}`` each, as the evaluator returns them) into ``gate_model``'s
    ``{slice: {"candidate": ..., "champion": ..., "<baseline>": ...}}``. The ``overall`` slice is dropped: the
    overall metrics are gated already."""
    out: dict[str, dict[str, Metrics]] = {}
    for name, metrics in candidate.items():
        if name == overall:
            continue
        row: dict[str, Metrics] = {"candidate": metrics}
        if champion is not None and name in champion:
            row["champion"] = champion[name]
        row.update({b: per_slice[name] for b, per_slice in baselines.items() if name in per_slice})
        out[name] = row
    return out


def gate_model(
    candidate: Metrics,
    champion: Metrics | None,
    baselines: Mapping[str, Metrics],
    slices: Mapping[str, Mapping[str, Metrics]],
    config: GateConfig,
) -> GateResult:
    """Judge a candidate's holdout metrics.

    ``champion`` is None for the first release. ``baselines`` maps a baseline name (``"popularity"``, ...) to its
    metrics. ``slices`` maps a slice name (``"related"``, ``"short_history"``) to ``{"candidate": metrics,
    "champion": metrics, "<baseline>": metrics}``; slice checks never block. The result's ``notes`` hold the
    metric table (candidate vs champion vs baselines, overall and per slice) for the report.
    """
    gated = [config.metric, *[m for m in config.secondary_metrics if m != config.metric]]
    tol = config.max_regression
    checks: list[Check] = []
    for m in gated:
        cand = _value(candidate, m)
        if champion is None:
            checks.append(Check(f"{m} vs champion", cand is not None, cand,
                                detail="no champion yet (first release): judged against baselines only"
                                if cand is not None else "candidate has no finite value"))
        else:
            checks.append(_vs_champion(f"{m} vs champion", cand, _value(champion, m), tol))
    m, base_name = config.metric, config.lift_baseline
    cand = _value(candidate, m)
    checks.append(_vs_baseline(f"{m} vs {base_name}", cand, _value(baselines.get(base_name), m), base_name,
                               config.min_lift_over_popularity))
    for name, metrics in baselines.items():
        if name != base_name:
            checks.append(_vs_baseline(f"{m} vs {name}", cand, _value(metrics, m), name, 0.0, blocking=False))
    for slice_name, by_model in slices.items():
        s_cand = _value(by_model.get("candidate"), m)
        label = f"slice {slice_name}: {m}"
        if by_model.get("champion") is not None:
            checks.append(_vs_champion(f"{label} vs champion", s_cand, _value(by_model["champion"], m), tol,
                                       blocking=False))
        else:
            checks.append(_vs_baseline(f"{label} vs {base_name}", s_cand, _value(by_model.get(base_name), m),
                                       base_name, config.min_lift_over_popularity, blocking=False))
    return GateResult("model", checks, notes=_metric_table(candidate, champion, baselines, slices))
