"""A batch of live events checked row by row against the data gate's rules, before the store acknowledges it.

The rules are the data gate's (``validation/data.py``) and the contract's (``towerflow/contract.py``), applied per
row so that a refusal names the row: the contract's columns and no others (``context_item_id``, ``query`` and the
optional ``request_id`` may be left out: null; ``query`` and ``request_id`` are strings or null; a ``query`` is at most
``MAX_QUERY_CHARS`` characters and only on the ``search`` surface: the contract's ``query_problem``, the rule
``/retrieve`` and the gate apply), the gate's not-null columns (``NOT_NULL``), ids that are integers in int64 and not negative
(``ID_COLUMNS``), ``action`` in ACTIONS, ``surface`` in SURFACES, timestamps that are datetimes or ISO-8601 strings
(naive means UTC; numbers are refused, as ``conform`` refuses them) and not in the future (``max_skew_s`` of clock
skew allowed), ``event_id`` unique in the batch (the same event twice is one event; two different events under one
id are refused), and the gate's referential integrity: ``user_id`` in the users table, ``item_id`` and a set
``context_item_id`` in the items table (when the caller knows the tables). The accepted batch is ``conform``-ed
(with ``request_id`` only when a row sets it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from towerflow.contract import (
    ACTIONS,
    MAX_QUERY_CHARS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SURFACES,
    ContractError,
    conform,
    query_problem,
)
from towerflow.serving.realtime.store import without_empty_optional
from towerflow.validation.data import ID_COLUMNS, NOT_NULL

COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS["events"] + tuple(OPTIONAL_COLUMNS["events"])  # (+ request_id)
_COLUMN_SET = frozenset(COLUMNS)
OPTIONAL: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NOT_NULL["events"])  # context_item_id, query, ...
INT64_MAX = 2**63 - 1


class EventBatchError(ContractError):
    """A batch refused whole; ``row`` is the first bad row (0-based, in the batch's order), None for the batch."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


def _is_int(v: object) -> bool:
    if isinstance(v, bool | np.bool_):
        return False
    if isinstance(v, int | np.integer):
        return True
    # a float column of a file (ids with blanks): whole numbers that a float holds exactly
    return isinstance(v, float | np.floating) and math.isfinite(v) and float(v).is_integer() and abs(v) < 2**53


def _null(v: object) -> bool:
    return v is None or (isinstance(v, float | np.floating) and math.isnan(v)) or v is pd.NaT or v is pd.NA


def _show(v: object) -> str:
    if _null(v):
        return "null"
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return repr(v.item() if isinstance(v, np.generic) else v)


def _kinds(values: pd.Series) -> set[type] | None:
    """The Python types in an object column (JSON's values), None for a typed column (from a file).

    A column whose kinds prove a rule holds skips that rule's row-by-row check: a batch of well-formed JSON pays a
    few set operations per column instead of a Python call per value; any other batch takes the row-by-row path,
    which names the bad row.
    """
    return set(map(type, values.to_numpy())) if values.dtype == object else None


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def to_frame(rows: Sequence[Mapping] | pd.DataFrame, where: str = "events") -> pd.DataFrame:
    """Records (JSON objects) or a table -> a frame with exactly the contract's columns (optional ones filled with
    null); EventBatchError naming the row for a record that is not an object or a column the contract lacks."""
    if isinstance(rows, pd.DataFrame):
        df = rows.reset_index(drop=True)
    else:
        for i, r in enumerate(rows):
            if type(r) is not dict and not isinstance(r, Mapping):  # (dict first: the ABC check is slow)
                raise EventBatchError(f"{where}[{i}]: an event is a JSON object, got {type(r).__name__}", i)
            if not r.keys() <= _COLUMN_SET:
                extra = [k for k in r if k not in _COLUMN_SET]
                raise EventBatchError(f"{where}[{i}]: unknown field(s) {extra}; an event has {list(COLUMNS)}", i)
        # object columns: JSON's values as they came (a column of ids with a null must not become float64)
        df = pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in COLUMNS})
    extra = [c for c in df.columns if c not in COLUMNS]
    if extra:
        raise EventBatchError(f"{where}: unknown column(s) {extra}; an event has {list(COLUMNS)}")
    missing = [c for c in COLUMNS if c not in df.columns and c not in OPTIONAL]
    if missing:
        raise EventBatchError(f"{where}: missing required column(s) {missing}; have {list(df.columns)}")
    for c in OPTIONAL:
        if c not in df.columns:
            df[c] = None
    return df[list(COLUMNS)]


# JSON batches whose values all have these Python types (bool is not int here: type() is exact) can be checked
# column by column with numpy (_clean_json); any other batch takes check_events' row-by-row path
_CLEAN_KINDS = {"event_id": {str}, "user_id": {int}, "item_id": {int}, "action": {str}, "ts": {str},
                "surface": {str}, "context_item_id": {int, type(None)}, "query": {str, type(None)},
                "request_id": {str, type(None)}}
_ACTION_SET, _SURFACE_SET = frozenset(ACTIONS), frozenset(SURFACES)
_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def _clean_json(rows: Sequence[Mapping], limit: pd.Timestamp,
                known_users: Callable[[np.ndarray], np.ndarray] | None,
                known_items: Callable[[np.ndarray], np.ndarray] | None, where: str) -> pd.DataFrame | None:
    """The conformed frame of a batch of JSON objects that passes every rule of the module docstring with each value
    already of its contract type, checked a column at a time; None as soon as a value has another type or a rule
    fails anywhere (then the row-by-row path finds and names the row). The same rules, without pandas' per-value
    calls: a well-formed batch costs about a third of the row-by-row path (it is most of POST /events' CPU)."""
    if not all(type(r) is dict and r.keys() <= _COLUMN_SET for r in rows):
        return None
    cols = {c: [r.get(c) for r in rows] for c in COLUMNS}
    if any(not set(map(type, cols[c])) <= kinds for c, kinds in _CLEAN_KINDS.items()):
        return None
    try:
        user, item = np.array(cols["user_id"], dtype=np.int64), np.array(cols["item_id"], dtype=np.int64)
        no_ctx = np.array([v is None for v in cols["context_item_id"]], dtype=bool)
        ctx = np.array([0 if v is None else v for v in cols["context_item_id"]], dtype=np.int64)
    except OverflowError:  # beyond int64
        return None
    if (user < 0).any() or (item < 0).any() or (ctx < 0).any() or "" in cols["event_id"]:
        return None
    if not (set(cols["action"]) <= _ACTION_SET and set(cols["surface"]) <= _SURFACE_SET):
        return None
    if any(q is not None and (s != "search" or len(q) > MAX_QUERY_CHARS)  # query_problem's rule, for the fast path
           for q, s in zip(cols["query"], cols["surface"], strict=True)):
        return None
    ts = pd.to_datetime(cols["ts"], utc=True, format="ISO8601", errors="coerce").as_unit("us")
    if ts.isna().any() or (ts > limit).any() or (ts < _EPOCH).any():
        return None
    if known_users is not None and not known_users(user).all():
        return None
    if known_items is not None and not (known_items(item).all() and known_items(ctx[~no_ctx]).all()):
        return None
    if len(set(cols["event_id"])) < len(rows):  # repeats (one event twice, or a clash): the row-by-row path
        return None
    return conform(pd.DataFrame({
        "event_id": pd.array(cols["event_id"], dtype="str"), "user_id": user, "item_id": item,
        "action": pd.array(cols["action"], dtype="str"), "ts": ts, "surface": pd.array(cols["surface"], dtype="str"),
        "context_item_id": pd.arrays.IntegerArray(ctx, no_ctx), "query": np.array(cols["query"], dtype=object),
        "request_id": np.array(cols["request_id"], dtype=object)}),
        "events", where)


def check_events(rows: Sequence[Mapping] | pd.DataFrame, *, now: datetime | None = None, max_skew_s: float = 5.0,
                 known_users: Callable[[np.ndarray], np.ndarray] | None = None,
                 known_items: Callable[[np.ndarray], np.ndarray] | None = None,
                 where: str = "events") -> pd.DataFrame:
    """The batch as a conformed events frame (duplicates of one event collapsed), or EventBatchError naming the
    first bad row and what is wrong with it (module docstring). ``known_users(ids)`` / ``known_items(ids)`` answer
    a boolean mask (None: not checked)."""
    limit = pd.Timestamp(now or datetime.now(UTC)) + timedelta(seconds=max_skew_s)
    if not isinstance(rows, pd.DataFrame) and len(rows) > 0:
        clean = _clean_json(rows, limit, known_users, known_items, where)
        if clean is not None:
            return without_empty_optional(clean)
    df = to_frame(rows, where)
    if len(df) == 0:
        raise EventBatchError(f"{where}: empty batch (nothing to ingest)")

    def bad(mask, col: str, what: str) -> None:
        r = _first(np.asarray(mask, dtype=bool))
        if r is not None:
            raise EventBatchError(f"{where}[{r}].{col}: {_show(df[col].iloc[r])} {what}", r)

    kinds = {c: _kinds(df[c]) for c in COLUMNS}
    for col in NOT_NULL["events"]:
        if kinds[col] is None or not kinds[col] <= {str, int, datetime, pd.Timestamp}:  # else: no null possible
            bad(df[col].map(_null).to_numpy(), col, "(required)")
    if kinds["event_id"] == {str}:
        bad(df["event_id"].to_numpy() == "", "event_id", "is not a non-empty string")
    else:
        bad(~df["event_id"].map(lambda v: isinstance(v, str) and v != "").to_numpy(), "event_id",
            "is not a non-empty string")
    for col in ID_COLUMNS["events"]:
        values = df[col]
        ints = None
        if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
            ints = values.to_numpy(dtype=np.int64, na_value=0)
            nulls = values.isna().to_numpy()
        elif kinds[col] is not None and kinds[col] <= {int, type(None)}:  # JSON integers (bool is not int here)
            nulls = values.isna().to_numpy()
            try:
                ints = np.array([0 if n else v for v, n in zip(values.to_numpy(), nulls, strict=True)], dtype=np.int64)
            except OverflowError:  # beyond int64: the row-by-row path below names it
                ints = None
        if ints is None:
            nulls = values.map(_null).to_numpy()
            bad(~nulls & ~values.map(_is_int).to_numpy(), col, "is not an integer id")
            big = values.map(lambda v: not _null(v) and not -INT64_MAX - 1 <= int(v) <= INT64_MAX).to_numpy()
            bad(big, col, "is beyond int64")
            ints = np.array([0 if n else int(v) for v, n in zip(values, nulls, strict=True)], dtype=np.int64)
        bad(~nulls & (ints < 0), col, "is negative (ids are not negative: FAISS answers -1 for 'no result')")
    bad(~df["action"].isin(ACTIONS).to_numpy(), "action", f"is not one of {list(ACTIONS)}")
    bad(~df["surface"].isin(SURFACES).to_numpy(), "surface", f"is not one of {list(SURFACES)}")
    for col in ("query", "request_id"):
        if kinds[col] is None or not kinds[col] <= {str, type(None)}:
            bad(~df[col].map(lambda v: _null(v) or isinstance(v, str)).to_numpy(), col, "is not a string or null")
    for r in np.flatnonzero(~df["query"].map(_null).to_numpy()).tolist():  # the rows with a query (few)
        if problem := query_problem(df["query"].iloc[r], df["surface"].iloc[r], f"{where}[{r}].query"):
            raise EventBatchError(problem, r)

    ts = df["ts"]
    if not pd.api.types.is_datetime64_any_dtype(ts.dtype):
        strings = (np.ones(len(ts), dtype=bool) if kinds["ts"] == {str}
                   else ts.map(lambda v: isinstance(v, str)).to_numpy())
        bad(~strings & ~ts.map(lambda v: isinstance(v, datetime)).to_numpy(), "ts",
            "is not an ISO-8601 string (epoch numbers are ambiguous: s? ms? ns?)")
        if strings.all():  # one parse for the batch; a row it cannot read is named
            parsed = pd.to_datetime(ts, utc=True, format="ISO8601", errors="coerce")
            bad(parsed.isna().to_numpy(), "ts", "is not a valid ISO-8601 time")
            df["ts"] = parsed
        else:
            bad([isinstance(v, str) and _null(pd.to_datetime(v, utc=True, format="ISO8601", errors="coerce"))
                 for v in ts], "ts", "is not a valid ISO-8601 time")
    df = conform(df, "events", where)
    bad((df["ts"] > limit).to_numpy(), "ts", f"is in the future (after {limit.isoformat()})")
    bad((df["ts"] < pd.Timestamp("1970-01-01", tz="UTC")).to_numpy(), "ts", "is before 1970")

    for col, known, table in (("user_id", known_users, "users"), ("item_id", known_items, "items"),
                              ("context_item_id", known_items, "items")):
        if known is None:
            continue
        values = df[col]
        present = values.notna().to_numpy()
        ok = np.ones(len(df), dtype=bool)
        ok[present] = known(values[present].to_numpy(dtype=np.int64))
        bad(~ok, col, f"is unknown to the source's {table} table")
    dup = df["event_id"].duplicated(keep=False).to_numpy()
    if dup.any():
        first = df.drop_duplicates().reset_index()  # identical repeats of one event are one event
        clash = first["event_id"].duplicated(keep=False).to_numpy()
        if clash.any():
            rows_ = first.loc[clash, "index"].tolist()
            eid = first.loc[clash, "event_id"].iloc[0]
            raise EventBatchError(f"{where}[{rows_[1]}].event_id: {eid!r} names two different events in this batch "
                                  f"(rows {rows_[:2]})", rows_[1])
        df = df.drop_duplicates().reset_index(drop=True)

    return without_empty_optional(df)
