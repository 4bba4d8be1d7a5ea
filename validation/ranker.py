"""Ranker gate: the candidate ranker against the baselines and the champion's ranker, on the same held-out requests.

Metric dicts are tasks/evaluate_ranker.py's (``"auc/mean"``, ``"auc/click"``, ``"gauc/save"``, ``"hit@3/hide"``).
Blocking checks (``RankerGateConfig``):

- ``holdout_requests``: at least ``min_holdout_requests`` held-out requests, else nothing can be judged;
- ``vs_<baseline>`` for each of ``blocking_baselines`` (popularity by default): the candidate's ``metric`` (mean
  per-head AUC by default) exceeds the baseline's by more than ``min_lift_over_baselines``;
- ``vs_champion``: on the rows both rankers score, the candidate's ``metric`` falls at most ``max_regression`` below
  the champion's ranker. With no champion ranker (the first release, or a champion without one) it passes and says so.

Non-blocking (warnings): the same check against the other baselines (profile_dot, the retrieval-score stand-in: the
user's long-term profile dot the candidate, which this flow's ranker, taking no dense features, cannot see whole), and
each head's AUC against the champion's, so a head that got worse shows in the report.
"""

from __future__ import annotations

from towerflow.config import RANKER_HEADS, RankerGateConfig
from towerflow.validation.model import _fmt, _value, _vs_baseline, _vs_champion
from towerflow.validation.result import Check, GateResult


def gate_ranker(ev, config: RankerGateConfig) -> GateResult:
    """``ev``: a ``tasks.ranking_stage.RankerEvaluation`` -> GateResult (module docstring)."""
    m = config.metric
    checks = [Check("holdout_requests", ev.n_requests >= config.min_holdout_requests, ev.n_requests,
                    config.min_holdout_requests, f"{ev.n_requests} held-out requests ({ev.n_rows} rows); at least "
                                                 f"{config.min_holdout_requests} needed")]
    cand = _value(ev.candidate, m)
    for name, metrics in ev.baselines.items():
        checks.append(_vs_baseline(f"vs_{name}", cand, _value(metrics, m), name, config.min_lift_over_baselines,
                                   blocking=name in config.blocking_baselines))
    if ev.champion is None:
        why = "; ".join(ev.notes) or "no champion ranker"
        checks.append(Check("vs_champion", True, cand, detail=f"{why}: judged against baselines only"))
    else:
        shared = ev.candidate_on_shared
        checks.append(_vs_champion("vs_champion", _value(shared, m), _value(ev.champion, m), config.max_regression))
        checks += [_vs_champion(f"vs_champion auc/{h}", _value(shared, f"auc/{h}"), _value(ev.champion, f"auc/{h}"),
                                config.max_regression, blocking=False)
                   for h in RANKER_HEADS if _value(ev.champion, f"auc/{h}") is not None]
    return GateResult("ranker", checks, notes=metric_table(ev))


def metric_table(ev) -> str:
    """Markdown: one row per head (AUC, GAUC, HIT@3) and the mean AUC; a column per model."""
    models = {"candidate": ev.candidate, **ev.baselines}
    if ev.champion is not None:
        models |= {"candidate (shared rows)": ev.candidate_on_shared, f"champion {ev.champion_release}": ev.champion}
    names = [f"{kind}/{h}" for h in RANKER_HEADS for kind in ("auc", "gauc", "hit@3")] + ["auc/mean"]
    out = [f"{ev.n_requests} held-out requests, {ev.n_rows} rows"
           + (f"; {ev.n_shared_rows} rows scored by both rankers" if ev.champion is not None else ""), "",
           "| metric | " + " | ".join(models) + " |", "|" + " --- |" * (len(models) + 1)]
    out += [f"| {n} | " + " | ".join(_fmt(_value(v, n)) for v in models.values()) + " |" for n in names]
    return "\n".join(out)
