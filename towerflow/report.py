"""What a person reads at the end of a retrain: the release, its metrics, and where to look next."""

from __future__ import annotations

from towerflow.config import Settings


def metric_table(rows: dict[str, dict[str, float]], metrics: tuple[str, ...] = ("recall@10", "ndcg@10", "recall@50",
                                                                                   "recall@100")) -> str:
    """A fixed-width table: one row per model, one column per metric (missing values shown as '-')."""
    width = max([len(n) for n in rows] + [8])
    head = f"{'model':<{width}}  " + "  ".join(f"{m:>10}" for m in metrics)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = "  ".join(f"{m[k]:>10.4f}" if k in m else f"{'-':>10}" for k in metrics)
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines)


def print_result(result, settings: Settings) -> None:
    print(f"status      {result.status}")
    print(f"release     {result.release_id}  (registered model '{settings.registered_model}' "
          f"version {result.model_version})")
    print(f"snapshot    {result.snapshot_id}")
    print(f"mlflow run  {result.mlflow_run_id}  ({settings.tracking_uri})")
    if result.previous_champion:
        print(f"previous    {result.previous_champion}")
    print()
    print(metric_table(result.comparison or {"candidate": result.metrics}))
