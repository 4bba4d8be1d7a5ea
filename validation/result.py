"""What every gate returns: a list of named checks, each with what was observed and the threshold it was held to.

A gate is a pure function returning a ``GateResult``; the Prefect task around it publishes ``to_markdown()`` as an
artifact, logs ``to_dict()`` / ``to_tags()`` to MLflow, then calls ``raise_if_failed()`` so the flow stops before
anything is promoted. Non-blocking checks (per-surface slices, comparisons with weak baselines) are reported as
warnings and never fail the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np

from towerflow.errors import TowerflowError

MAX_EXAMPLES = 5  # example values shown per check in messages and tables


class GateFailed(TowerflowError):
    """A gate refused a snapshot, model, index or release. ``result`` holds the full ``GateResult``."""

    def __init__(self, result: GateResult):
        self.result = result
        super().__init__(result.failure_message())

    def __reduce__(self):  # unpickling (Prefect states, Dask workers) must rebuild from the result, not the message
        return (type(self), (self.result,))


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars, arrays, timestamps and tuples turned into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, datetime | date):  # pd.Timestamp is a datetime
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _fmt(value: Any) -> str:
    """Short human form: floats to 4 significant digits, everything else as str."""
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    if value is None:
        return ""
    return str(jsonable(value))


@dataclass
class Check:
    """One named test inside a gate.

    ``observed`` is what was measured (a count of offending rows, a metric, a latency); ``threshold`` is what it was
    held to; ``detail`` says in words what went wrong or right; ``examples`` are a few offending values or rows.
    """

    name: str
    passed: bool
    observed: Any = None
    threshold: Any = None
    detail: str = ""
    examples: list = field(default_factory=list)
    blocking: bool = True

    def line(self) -> str:
        """``name: detail, e.g. [examples]`` (the form used in summaries and error messages)."""
        text = self.name
        if self.detail:
            text += f": {self.detail}"
        elif self.observed is not None:
            text += f": observed {_fmt(self.observed)}, threshold {_fmt(self.threshold)}"
        if self.examples:
            text += f", e.g. {jsonable(self.examples[:MAX_EXAMPLES])}"
        return text

    def to_dict(self) -> dict:
        return jsonable(
            {
                "name": self.name,
                "passed": bool(self.passed),
                "blocking": bool(self.blocking),
                "observed": self.observed,
                "threshold": self.threshold,
                "detail": self.detail,
                "examples": self.examples[:MAX_EXAMPLES],
            }
        )


@dataclass
class GateResult:
    """The outcome of one gate. It passes when every blocking check passes.

    ``notes`` is extra markdown (e.g. the model gate's metric table) appended to ``to_markdown()``.
    """

    gate: str
    checks: list[Check]
    notes: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.blocking)

    @property
    def failed_checks(self) -> list[Check]:
        """Blocking checks that failed (the reasons the gate refuses)."""
        return [c for c in self.checks if c.blocking and not c.passed]

    @property
    def warnings(self) -> list[Check]:
        """Non-blocking checks that failed: reported, never fatal."""
        return [c for c in self.checks if not c.blocking and not c.passed]

    def check(self, name: str) -> Check:
        """The check called ``name``; KeyError lists the names there are."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"{self.gate} gate has no check {name!r}; checks: {[c.name for c in self.checks]}")

    def summary(self) -> str:
        """One line: the verdict and, when it failed, each failing check with its counts and examples."""
        n = sum(c.blocking for c in self.checks)
        if self.passed:
            text = f"{self.gate} gate passed ({n} checks)"
        else:
            failed = self.failed_checks
            text = f"{self.gate} gate FAILED ({len(failed)} of {n} checks): " + "; ".join(c.line() for c in failed)
        if self.warnings:
            text += f" [warnings: {'; '.join(c.line() for c in self.warnings)}]"
        return text

    def failure_message(self) -> str:
        """Multi-line message for GateFailed: the gate, then one line per failing check."""
        failed = self.failed_checks
        lines = [f"{self.gate} gate failed: {len(failed)} of {sum(c.blocking for c in self.checks)} checks"]
        lines += [f"  - {c.line()}" for c in failed]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise ``GateFailed`` (a TowerflowError) naming every failing check; return quietly otherwise."""
        if not self.passed:
            raise GateFailed(self)

    def to_markdown(self) -> str:
        """A markdown report for the Prefect UI: verdict line and one table row per check."""
        verdict = "passed" if self.passed else "**FAILED**"
        out = [f"### {self.gate} gate: {verdict}", "", self.summary(), ""]
        out += ["| check | result | observed | threshold | detail |", "| --- | --- | --- | --- | --- |"]
        for c in self.checks:
            status = "pass" if c.passed else ("**FAIL**" if c.blocking else "warn")
            detail = c.detail + (f" e.g. {jsonable(c.examples[:MAX_EXAMPLES])}" if c.examples else "")
            cells = [c.name, status, _fmt(c.observed), _fmt(c.threshold), detail]
            out.append("| " + " | ".join(_cell(x) for x in cells) + " |")
        if self.notes:
            out += ["", self.notes.rstrip()]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict:
        """JSON-ready form for an MLflow artifact."""
        return {
            "gate": self.gate,
            "passed": self.passed,
            "summary": self.summary(),
            "failed": [c.name for c in self.failed_checks],
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_tags(self, max_len: int = 4_000) -> dict[str, str]:
        """Flat string tags for the MLflow run: ``gate.<name>.passed`` / ``.failed`` / ``.summary``."""
        prefix = f"gate.{self.gate}"
        return {
            f"{prefix}.passed": str(self.passed).lower(),
            f"{prefix}.failed": ",".join(c.name for c in self.failed_checks)[:max_len],
            f"{prefix}.summary": self.summary()[:max_len],
        }


def _cell(text: str) -> str:
    """Markdown table cells may not contain pipes or newlines."""
    return str(text).replace("|", "\\|").replace("\n", " ")
