"""Data gate: a Great Expectations 1.x suite over one extracted snapshot (events, users, items).

Checks (one ``Check`` each, named ``<table>.<what>``): required columns present, column types, not-null keys,
``action`` in ACTIONS and ``surface`` in SURFACES, ids not negative (int64 by type; FAISS answers -1 for "no
result", so a negative item id would vanish from answers), timestamps inside ``[window_start, window_end)`` and
not after ``now``, unique ids, referential integrity (events -> users, items; ``context_item_id`` -> items when set),
``query`` (a string) at most ``MAX_QUERY_CHARS`` characters and only on ``search`` (what /retrieve accepts), and
events-per-day and positive-rate bounds relative to the previous snapshot (an empty window always fails). The
positive-rate bounds apply only where negatives can exist: not to a source recorded as ``implicit`` feedback.

A column that is missing or has the wrong dtype fails its own check; the value checks that need it are left out
rather than crashing GX. Two checks run on derived columns added to a copy of the events: ``_is_positive`` (0/1,
its mean is the positive rate) and ``_unknown_<col>`` (the id where the join with users/items found nothing, else
null; GX expects it to be null, so its report lists the unknown ids). GX is imported inside the function (it costs
~4 s) and one ephemeral context is built per call. The raw GX results come back as JSON for an MLflow artifact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from towerflow.config import GateConfig
from towerflow.contract import (
    ACTIONS,
    DEFAULT_FEEDBACK,
    POSITIVE_ACTIONS,
    REQUIRED_COLUMNS,
    SURFACES,
    negatives_possible,
)
from towerflow.data.source import day_range
from towerflow.errors import TowerflowError
from towerflow.models.query import MAX_QUERY_CHARS
from towerflow.validation.result import MAX_EXAMPLES, Check, GateResult, jsonable

if TYPE_CHECKING:
    from towerflow.tasks.extract import Snapshot

# GX type names per contract column. GX compares ``dtype.type``: "int64" accepts int64 and Int64, "Timestamp"
# accepts tz-aware datetimes only, "str" accepts pandas 3's ``str`` dtype and object columns holding strings.
COLUMN_TYPES: dict[str, dict[str, str]] = {
    "events": {
        "event_id": "str", "user_id": "int64", "item_id": "int64", "action": "str", "ts": "Timestamp",
        "surface": "str", "context_item_id": "int64", "query": "str",
    },
    "users": {"user_id": "int64", "signup_ts": "Timestamp"},
    "items": {"item_id": "int64", "category": "str", "genres": "str", "title": "str", "created_ts": "Timestamp"},
}
NOT_NULL: dict[str, tuple[str, ...]] = {
    "events": ("event_id", "user_id", "item_id", "action", "ts", "surface"),
    "users": ("user_id",),
    "items": ("item_id", "category"),
}
UNIQUE = {"events": "event_id", "users": "user_id", "items": "item_id"}
ID_COLUMNS = {"events": ("user_id", "item_id", "context_item_id"), "users": ("user_id",), "items": ("item_id",)}
POSITIVE_COL = "_is_positive"  # derived 0/1 column whose mean is the positive rate
OFF_SEARCH_COL = "_query_off_search"  # derived: the surface of an event that carries a query off `search`, else null


@dataclass(frozen=True)
class SnapshotStats:
    """Volume and positive rate of a snapshot that passed, kept to bound the next one."""

    row_count: int
    positive_rate: float
    window_days: float

    @property
    def events_per_day(self) -> float:
        return self.row_count / self.window_days

    def to_dict(self) -> dict:
        return {"row_count": self.row_count, "positive_rate": self.positive_rate, "window_days": self.window_days}

    @classmethod
    def from_dict(cls, d: dict) -> SnapshotStats:
        return cls(int(d["row_count"]), float(d["positive_rate"]), float(d["window_days"]))


@dataclass
class DataGateResult(GateResult):
    """The data gate's checks plus the raw GX results (``{table: validation result JSON}``) and this snapshot's stats."""

    gx_results: dict = field(default_factory=dict)
    stats: SnapshotStats | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["stats"] = jsonable(self.stats.to_dict()) if self.stats else None
        return out


@dataclass
class _Spec:
    """One expectation and how to word its result: ``what`` completes "N of M rows <what>"."""

    table: str
    name: str
    expectation: Any
    what: str = ""
    rows_as_examples: bool = False  # for null checks the offending value is None: show row numbers instead
    rows_too: bool = False  # also name the offending rows in the detail


def _utc(ts: datetime | pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


def _matches(series: pd.Series, type_: str) -> bool:
    """Whether GX's type check will accept ``series`` (mirrors its ``dtype.type`` comparison)."""
    kind = series.dtype.type
    if type_ == "int64":
        return kind is np.int64
    if type_ == "Timestamp":
        return kind is pd.Timestamp
    return kind is str or series.dtype == object


def _round(x: float) -> float:
    return round(x, 9)  # float noise from per-day scaling must not move an integer bound


def _volume_bounds(previous: SnapshotStats | None, days: float, config: GateConfig) -> tuple[int, int | None, str]:
    if previous is None or previous.row_count == 0:
        return 1, None, "no previous snapshot: only an empty window fails"
    expected = previous.events_per_day * days
    lo = max(1, math.floor(_round(expected / config.max_volume_drop)) + 1)
    hi = max(lo, math.ceil(_round(expected * config.max_volume_growth)) - 1)
    note = (
        f"previous snapshot {previous.events_per_day:.1f}/day -> {expected:.0f} expected over {days:g} days; "
        f"a {config.max_volume_drop:g}x drop or {config.max_volume_growth:g}x growth fails"
    )
    return lo, hi, note


def _rate_bounds(previous: SnapshotStats | None, config: GateConfig) -> tuple[float, float, str]:
    lo, hi = config.positive_rate_range
    if previous is None or not previous.positive_rate > 0:
        return lo, hi, "absolute bounds only (no previous rate)"
    r = config.max_positive_rate_ratio
    note = f"previous rate {previous.positive_rate:.4f}, at most {r:g}x change"
    return max(lo, previous.positive_rate / r), min(hi, previous.positive_rate * r), note


def _specs(frames: dict[str, pd.DataFrame], start: pd.Timestamp, end: pd.Timestamp, now: pd.Timestamp,
           previous: SnapshotStats | None, config: GateConfig, days: float,
           rate_checked: bool) -> tuple[list[_Spec], dict[str, pd.Series]]:
    """The expectations to run, and the derived columns (name -> series) the events frame needs for them."""
    import great_expectations.expectations as gxe

    specs: list[_Spec] = []
    usable: dict[str, set[str]] = {}
    for table, df in frames.items():
        required = list(REQUIRED_COLUMNS[table])
        specs.append(_Spec(table, f"{table}.columns", gxe.ExpectTableColumnsToMatchSet(column_set=required, exact_match=False)))
        present = [c for c in required if c in df.columns]
        for col in present:
            type_ = COLUMN_TYPES[table][col]
            specs.append(_Spec(table, f"{table}.{col} type", gxe.ExpectColumnValuesToBeOfType(column=col, type_=type_),
                               f"not of type {type_}"))
        usable[table] = {c for c in present if _matches(df[c], COLUMN_TYPES[table][c])}
        for col in NOT_NULL[table]:
            if col in df.columns:
                specs.append(_Spec(table, f"{table}.{col} not null", gxe.ExpectColumnValuesToNotBeNull(column=col),
                                   "null", rows_as_examples=True))
        key = UNIQUE[table]
        if key in df.columns:
            specs.append(_Spec(table, f"{table}.{key} unique", gxe.ExpectColumnValuesToBeUnique(column=key), "duplicated"))
        if table != "events":
            specs.append(_Spec(table, f"{table}.row count", gxe.ExpectTableRowCountToBeBetween(min_value=1)))
        for col in ID_COLUMNS[table]:
            if col in usable[table]:  # an int64 id fits int64 by its type; FAISS answers -1 for "no result"
                specs.append(_Spec(table, f"{table}.{col} not negative",
                                   gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0), "negative",
                                   rows_too=True))

    ev, ok = frames["events"], usable["events"]
    derived: dict[str, pd.Series] = {}
    if "action" in ok:
        specs.append(_Spec("events", "events.action in ACTIONS",
                           gxe.ExpectColumnValuesToBeInSet(column="action", value_set=list(ACTIONS)), f"not in {list(ACTIONS)}"))
    if "surface" in ok:
        specs.append(_Spec("events", "events.surface in SURFACES",
                           gxe.ExpectColumnValuesToBeInSet(column="surface", value_set=list(SURFACES)), f"not in {list(SURFACES)}"))
    if "ts" in ok:
        specs.append(_Spec("events", "events.ts inside window", gxe.ExpectColumnValuesToBeBetween(
            column="ts", min_value=start.to_pydatetime(), max_value=end.to_pydatetime(), strict_max=True),
            f"outside [{start.isoformat()}, {end.isoformat()})"))
        specs.append(_Spec("events", "events.ts not in future", gxe.ExpectColumnValuesToBeBetween(
            column="ts", max_value=now.to_pydatetime()), f"after now ({now.isoformat()})"))
    for col, table, ref in (("user_id", "users", "user_id"), ("item_id", "items", "item_id"),
                            ("context_item_id", "items", "item_id")):
        if col in ok and ref in usable[table]:
            # The join runs in pandas and GX counts and reports what it left: an in-set expectation holding every
            # id is re-serialized by GX on each access to its config (8 s at 6k ids, minutes at 100k).
            values = ev[col].astype("Int64")
            unknown = f"_unknown_{col}"
            derived[unknown] = values.where(values.notna() & ~values.isin(frames[table][ref]))
            specs.append(_Spec("events", f"events.{col} in {table}", gxe.ExpectColumnValuesToBeNull(column=unknown),
                               f"unknown to {table}.{ref}"))
    if "query" in ok and "surface" in ok:
        # GX skips nulls in both expectations: only the queries present are judged
        specs.append(_Spec("events", f"events.query at most {MAX_QUERY_CHARS} characters",
                           gxe.ExpectColumnValueLengthsToBeBetween(column="query", max_value=MAX_QUERY_CHARS),
                           f"longer than {MAX_QUERY_CHARS} characters", rows_too=True))
        derived[OFF_SEARCH_COL] = ev["surface"].where(ev["query"].notna() & (ev["surface"] != "search"))
        specs.append(_Spec("events", "events.query only on search", gxe.ExpectColumnValuesToBeNull(column=OFF_SEARCH_COL),
                           "a query on this surface", rows_too=True))
    lo, hi, _ = _volume_bounds(previous, days, config)
    specs.append(_Spec("events", "events.row count", gxe.ExpectTableRowCountToBeBetween(min_value=lo, max_value=hi)))
    if "action" in ok and len(ev):
        derived[POSITIVE_COL] = ev["action"].isin(POSITIVE_ACTIONS).astype("int64")
    if rate_checked and POSITIVE_COL in derived:
        rlo, rhi, _ = _rate_bounds(previous, config)
        specs.append(_Spec("events", "events.positive rate",
                           gxe.ExpectColumnMeanToBeBetween(column=POSITIVE_COL, min_value=rlo, max_value=rhi)))
    return specs, derived


def _coverage_checks(events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, config: GateConfig,
                     misplaced: dict | None, known_empty: set[str], ts_ok: bool) -> list[Check]:
    """What extract saw but the events frame cannot show: rows filed under another day (dropped), and days of the
    window without events (every day but those the source records as gaps, and the last one always: the holdout
    is cut from it)."""
    m = misplaced or {}
    n_bad, outside = int(m.get("rows", 0)), int(m.get("outside_window", 0))
    limit = config.max_misplaced_events
    by_day = ", ".join(f"dt={d}: {n}" for d, n in sorted((m.get("by_day") or {}).items()))
    detail = (f"{n_bad} row(s) of the window's partitions have a ts outside their partition's day, {outside} of "
              f"them outside the window; extract kept none of them ({by_day}); allowed {limit}" if n_bad else
              "every row of the window's partitions is on its partition's day")
    checks = [Check("events.ts on partition day", n_bad <= limit, n_bad, limit, detail,
                    list(m.get("examples") or [])[:MAX_EXAMPLES])]
    if not ts_ok:
        return checks
    days = [d.isoformat() for d in day_range(start.to_pydatetime(), end.to_pydatetime())]
    inside = events.ts[(events.ts >= start) & (events.ts < end)]
    counts = inside.dt.strftime("%Y-%m-%d").value_counts()
    empty = [d for d in days if not counts.get(d, 0) and d not in known_empty]
    gaps = sum(1 for d in days if not counts.get(d, 0) and d in known_empty)
    allowed = config.max_empty_days
    checks.append(Check("events.every day has events", len(empty) <= allowed, len(empty), allowed,
                        f"{len(empty)} of {len(days)} day(s) of the window have no events; allowed {allowed}"
                        + (f" ({gaps} more recorded by the source as empty in the data it imported)" if gaps else ""),
                        empty[:MAX_EXAMPLES]))
    last = days[-1]
    checks.append(Check("events.last day has events", bool(counts.get(last, 0)), int(counts.get(last, 0)), 1,
                        f"{int(counts.get(last, 0))} events on the window's last day {last}"))
    return checks


def _exception_message(info: dict) -> str | None:
    """GX nests exception info per metric when a metric failed to compute; find the first message."""
    if not info:
        return None
    if info.get("raised_exception"):
        return info.get("exception_message") or "unknown error"
    for v in info.values():
        if isinstance(v, dict) and v.get("raised_exception"):
            return v.get("exception_message") or "unknown error"
    return None


def _to_check(spec: _Spec, r: Any, notes: dict[str, str]) -> Check:
    res, kw = r.result or {}, r.expectation_config.kwargs
    error = _exception_message(r.exception_info)
    if error:
        return Check(spec.name, False, detail=f"could not evaluate: {error}")
    ok = bool(r.success)
    if "unexpected_count" in res and "element_count" in res:  # column map expectation
        n_bad, n = int(res["unexpected_count"]), int(res["element_count"])
        if spec.rows_as_examples:
            examples = list(res.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]
            detail = f"{n_bad} of {n} rows {spec.what}" + (f" (rows {examples})" if examples else "")
            return Check(spec.name, ok, n_bad, 0, detail)
        counts = res.get("partial_unexpected_counts") or []
        examples = [c["value"] for c in counts][:MAX_EXAMPLES] or list(res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]
        rows = list(res.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES] if spec.rows_too else []
        detail = f"{n_bad} of {n} rows {spec.what}" + (f" (rows {rows})" if rows else "")
        return Check(spec.name, ok, n_bad, 0, detail, jsonable(examples))
    observed = res.get("observed_value")
    etype = r.expectation_config.type
    if etype == "expect_table_columns_to_match_set":
        missing = sorted(((res.get("details") or {}).get("mismatched") or {}).get("missing") or [])
        return Check(spec.name, ok, missing, sorted(kw["column_set"]),
                     f"missing {missing}" if missing else "all required columns present")
    if etype == "expect_column_values_to_be_of_type":
        return Check(spec.name, ok, observed, kw["type_"], f"dtype {observed}, expected {kw['type_']}")
    lo, hi = kw.get("min_value"), kw.get("max_value")
    bounds = f"[{_num(lo)}, {_num(hi) if hi is not None else 'inf'}]"
    if etype == "expect_table_row_count_to_be_between":
        empty = "empty window" if spec.table == "events" else "empty table"
        detail = empty if observed == 0 else f"{observed} rows, allowed {bounds}"
        note = notes.get(spec.name)
        return Check(spec.name, ok, observed, bounds, detail + (f"; {note}" if note else ""))
    note = notes.get(spec.name, "")
    return Check(spec.name, ok, observed, bounds, f"{_num(observed)}, allowed {bounds}" + (f"; {note}" if note else ""))


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float | np.floating) else str(x)


def validate_snapshot(
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    window_start: datetime | pd.Timestamp,
    window_end: datetime | pd.Timestamp,
    previous: SnapshotStats | None,
    config: GateConfig,
    now: datetime | pd.Timestamp | None = None,
    feedback: str = DEFAULT_FEEDBACK,
    misplaced: dict | None = None,
    known_empty_days: Iterable[str] = (),
) -> DataGateResult:
    """Run the data suite on a snapshot whose events should lie in ``[window_start, window_end)``.

    ``previous`` is the stats of the last snapshot that passed (None on the first run: only an empty window fails
    the volume check). ``now`` defaults to the current UTC time. Naive datetimes are taken as UTC. ``feedback`` is
    the source's kind (``Snapshot.feedback``): for ``implicit`` sources no negative can exist, so the positive rate
    is not gated (the check is reported as passed, saying why). ``misplaced`` is what extract counted but could
    not keep (``Snapshot.misplaced``: rows filed under a day other than their ts); None means none.
    ``known_empty_days`` (ISO dates, ``Snapshot.known_empty_days``) are gaps the source recorded in the data it
    imported: not failures.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    start, end = _utc(window_start), _utc(window_end)
    if end <= start:
        raise TowerflowError(f"data gate: window end {end} is not after window start {start}")
    now_ts = _utc(now) if now is not None else pd.Timestamp.now(tz="UTC")
    days = (end - start).total_seconds() / 86_400
    frames = {"events": events, "users": users, "items": items}
    rate_checked = negatives_possible(feedback)
    specs, derived = _specs(frames, start, end, now_ts, previous, config, days, rate_checked)
    frames["events"] = events = events.assign(**derived)  # a new frame: the caller's snapshot is left as it was
    notes = {"events.row count": _volume_bounds(previous, days, config)[2],
             "events.positive rate": _rate_bounds(previous, config)[2]}

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # keep flow logs clean
    source = ctx.data_sources.add_pandas("snapshot")
    checks: list[Check] = []
    gx_results: dict[str, dict] = {}
    for table, df in frames.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        mine = [s for s in specs if s.table == table]
        for s in mine:
            s.expectation.meta = {"check": s.name}  # how results find their way back to the check
        # Expectations given to the constructor are stored once; add_expectation re-serializes the suite each time.
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"towerflow-{table}", expectations=[s.expectation for s in mine]))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=f"towerflow-{table}"))
        run = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
        gx_results[table] = jsonable(run.to_json_dict())
        done = {r.expectation_config.meta["check"]: r for r in run.results}
        checks += [_to_check(s, done[s.name], notes) for s in mine]
    ts_ok = "ts" in events.columns and _matches(events["ts"], "Timestamp")
    checks += _coverage_checks(events, start, end, config, misplaced, set(known_empty_days), ts_ok)
    if not rate_checked:
        checks.append(Check("events.positive rate", True, detail="not applied: implicit feedback (the source logs "
                            "only engagements, so every event is positive and no negative can exist)"))

    rate = float(events[POSITIVE_COL].mean()) if POSITIVE_COL in events.columns and len(events) else float("nan")
    stats = SnapshotStats(len(events), rate, days)
    return DataGateResult("data", checks, gx_results=gx_results, stats=stats)


def validate_extracted(snapshot: Snapshot, previous: SnapshotStats | None, config: GateConfig,
                       now: datetime | pd.Timestamp | None = None) -> DataGateResult:
    """The data gate on what extract produced: its rows and window, the source's feedback kind, the rows extract
    counted but could not keep, and the empty days the source recorded. The flow and the benchmarks call this."""
    start, end = snapshot.window
    return validate_snapshot(snapshot.events(), snapshot.users(), snapshot.items(), start, end, previous, config,
                             now=now, feedback=snapshot.feedback, misplaced=snapshot.misplaced,
                             known_empty_days=snapshot.known_empty_days)
