"""What the importers share: strict column parsing with errors that name the file and line, content-based event
ids, the import summary, and an all-or-nothing writer (the source appears complete or not at all).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from towerflow.contract import ACTIONS, ContractError
from towerflow.data.source import ParquetSink
from towerflow.progress import progress


@dataclass(frozen=True)
class ImportSummary:
    """What an importer wrote. ``action_counts`` follows the order of ``towerflow.contract.ACTIONS``."""

    layout: str
    source: str
    out_uri: str
    n_events: int
    n_users: int
    n_items: int
    n_days: int
    first_ts: datetime
    last_ts: datetime
    action_counts: tuple[tuple[str, int], ...]
    seconds: float
    notes: tuple[str, ...] = ()
    feedback: str = "explicit"

    def __str__(self) -> str:
        actions = " · ".join(f"{a} {n:,}" for a, n in self.action_counts)
        lines = [
            f"imported {self.layout} from {self.source} -> {self.out_uri}",
            f"  events {self.n_events:,}   users {self.n_users:,}   items {self.n_items:,}   days {self.n_days:,}",
            f"  time   {self.first_ts:%Y-%m-%d %H:%M:%S} .. {self.last_ts:%Y-%m-%d %H:%M:%S} UTC",
            f"  actions {actions}",
            f"  feedback {self.feedback}" + (" (only positives: the data gate skips its positive-rate checks)"
                                             if self.feedback == "implicit" else ""),
            *(f"  note   {n}" for n in self.notes),
            f"  took {self.seconds:.1f}s",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------- parsing helpers: every error names file and line


def require_file(path: str) -> str:
    """Return ``path`` if it is a readable, non-empty file; else a ContractError naming it."""
    if not os.path.exists(path):
        raise ContractError(f"{path}: no such file or directory")
    if not os.path.isfile(path):
        raise ContractError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise ContractError(f"{path}: empty file")
    return path


def _first_bad(series: pd.Series, bad: pd.Series, first_line: int) -> str:
    pos = int(bad.to_numpy().nonzero()[0][0])
    return f"line {pos + first_line}: {series.iloc[pos]!r}"


INT64_MAX = int(np.iinfo(np.int64).max)
# What pandas (and most tools) read as a missing value: never an id.
MISSING_MARKERS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                             "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def check_scalars(values: pd.Series, where: str, column: str, first_line: int, what: str = "ids") -> None:
    """Refuse cells that hold lists, arrays or mappings (a Parquet list column) and boolean columns."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise ContractError(f"{where}: {column} holds booleans, not {what}; line {first_line}: {values.iloc[0]!r}")
    if values.dtype == object:
        nested = values.map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray))
        if nested.any():
            raise ContractError(f"{where}: {column} must hold one value per row, not lists; "
                                f"{_first_bad(values, nested, first_line)}")


def _check_id_range(values: pd.Series, negative: pd.Series, too_big: pd.Series, where: str, column: str,
                    first_line: int) -> None:
    if negative.any():
        raise ContractError(f"{where}: {column} ids must be >= 0 (FAISS answers -1 for 'no result'); "
                            f"{_first_bad(values, negative, first_line)}")
    if too_big.any():
        raise ContractError(f"{where}: {column} ids must fit int64 (at most {INT64_MAX}); "
                            f"{_first_bad(values, too_big, first_line)}")


def int_ids(values: pd.Series, where: str, column: str, first_line: int) -> pd.Series | None:
    """Ids -> int64 when every value is a whole number written plainly (integer column, or text without leading
    zeros); None when some are other text (the caller factorizes or refuses). Refused, naming the first line:
    empty cells and missing-value markers (``nan``, ``NULL`` ...), lists, booleans, negative ids and ids beyond
    int64.
    """
    check_scalars(values, where, column, first_line)
    if pd.api.types.is_integer_dtype(values.dtype):
        if values.isna().any():
            raise ContractError(f"{where}: {column} is empty; {_first_bad(values, values.isna(), first_line)}")
        big = values > INT64_MAX if values.dtype.kind == "u" else pd.Series(False, index=values.index)
        _check_id_range(values, values < 0, big, where, column, first_line)
        return values.astype("int64")
    text = values.astype("str").str.strip()
    missing = values.isna() | text.isin(MISSING_MARKERS)
    if missing.any():
        raise ContractError(f"{where}: {column} is empty or a missing-value marker; "
                            f"{_first_bad(values, missing, first_line)}")
    if not text.str.fullmatch(r"-?(0|[1-9]\d*)").all():
        return None
    neg = text.str.startswith("-")
    digits = text.str.len()
    big = ~neg & ((digits > len(str(INT64_MAX))) | ((digits == len(str(INT64_MAX))) & (text > str(INT64_MAX))))
    _check_id_range(values, neg, big, where, column, first_line)
    return text.astype("int64")


def parse_ids(values: pd.Series, where: str, column: str, first_line: int) -> pd.Series:
    """``int_ids``, with any value that is not a plain whole number an error naming its line."""
    ids = int_ids(values, where, column, first_line)
    if ids is None:
        bad = ~values.astype("str").str.strip().str.fullmatch(r"-?(0|[1-9]\d*)")
        raise ContractError(f"{where}: {column} must be whole numbers; {_first_bad(values, bad, first_line)}")
    return ids


def parse_ints(series: pd.Series, where: str, column: str, first_line: int) -> pd.Series:
    """Strings (or numbers) -> int64; a value that is not a whole number is an error naming its line.

    ``first_line`` is the file line of the first data row (1 without a header, 2 with one).
    """
    if not pd.api.types.is_float_dtype(series.dtype):  # astype would truncate 1.5 to 1
        try:  # fast path; the slow one below only runs to find and quote the bad line
            return series.astype("int64")
        except (ValueError, TypeError):
            pass
    num = pd.to_numeric(series, errors="coerce")
    bad = num.isna() | (num != num.round())
    if bad.any():
        raise ContractError(f"{where}: {column} must be integers; {_first_bad(series, bad, first_line)}")
    return num.astype("int64")


# Epoch numbers by magnitude: seconds reach 1e11 only in the year 5138, milliseconds 1e14 in 5138, and so on.
EPOCH_UNITS: tuple[tuple[float, str, str], ...] = (
    (1e11, "s", "seconds"), (1e14, "ms", "milliseconds"), (1e17, "us", "microseconds"), (np.inf, "ns", "nanoseconds"),
)
TS_RANGE = (pd.Timestamp("1970-01-01", tz="UTC"), pd.Timestamp("2262-04-11", tz="UTC"))


def _unit_class(num: pd.Series) -> np.ndarray:
    return np.searchsorted([b for b, _, _ in EPOCH_UNITS], num.abs().to_numpy(), side="right")


def parse_epoch(series: pd.Series, where: str, column: str, first_line: int) -> tuple[pd.Series, str]:
    """Epoch numbers (strings or numbers) -> (UTC timestamps (us), the unit's name).

    The unit is told by magnitude (``EPOCH_UNITS``): 1.7e9 is seconds, 1.7e12 milliseconds, 1.7e15 microseconds,
    1.7e18 nanoseconds. A column whose values fall in different units, booleans, and times outside
    ``TS_RANGE`` are refused naming the first such line.
    """
    check_scalars(series, where, column, first_line, "times")
    try:
        num = series.astype("float64")
    except (ValueError, TypeError):
        num = pd.to_numeric(series, errors="coerce")
    bad = ~np.isfinite(num)  # NaN, and inf/-inf (no epoch unit fits them)
    if bad.any():
        raise ContractError(f"{where}: unparseable timestamps in {column}; {_first_bad(series, bad, first_line)}")
    cls = _unit_class(num)
    top = int(cls.max())
    mixed = cls != top
    if top > 0 and mixed.any():
        pos = int(mixed.nonzero()[0][0])
        first_top = int((cls == top).nonzero()[0][0])
        raise ContractError(
            f"{where}: {column} mixes epoch units: line {first_top + first_line} looks like {EPOCH_UNITS[top][2]} "
            f"({series.iloc[first_top]!r}), line {pos + first_line} like {EPOCH_UNITS[int(cls[pos])][2]} "
            f"({series.iloc[pos]!r})"
        )
    unit, unit_name = EPOCH_UNITS[top][1], EPOCH_UNITS[top][2]
    # Nanoseconds beyond int64 would wrap to NaT in the cast and pass a plain range check: refuse them first.
    over = (num.abs() >= 2**63) if unit == "ns" else pd.Series(False, index=num.index)
    ts = pd.to_datetime(num.mask(over, 0).round().astype("int64") if unit == "ns" else num, unit=unit, utc=True)
    out = over | ts.isna() | (ts < TS_RANGE[0]) | (ts >= TS_RANGE[1])
    if out.any():
        raise ContractError(
            f"{where}: timestamps in {column} must be in [{TS_RANGE[0]:%Y-%m-%d}, {TS_RANGE[1]:%Y-%m-%d}) (read as "
            f"{unit_name} since 1970-01-01 UTC); {_first_bad(series, out, first_line)}"
        )
    return ts.astype("datetime64[us, UTC]"), unit_name


def exact_duplicates(rows: pd.DataFrame, where: str, first_line: int) -> tuple[pd.Series, str | None]:
    """Rows identical in every column to an earlier one: (mask of the rows to keep, a note counting the others).

    An exact repeat (same user, item, time and action) is double ingestion, not a second event: it is collapsed,
    and the import summary says how many and where the first one was.
    """
    text = rows.astype("str")  # hashable whatever the cells hold
    group = text.groupby(list(text.columns), dropna=False, sort=False).ngroup().to_numpy()
    dup = pd.Series(pd.Series(group).duplicated().to_numpy(), index=rows.index)
    if not dup.any():
        return ~dup, None
    pos = int(dup.to_numpy().nonzero()[0][0])
    orig = int((group == group[pos]).nonzero()[0][0])
    note = (f"{int(dup.sum()):,} exact duplicate row(s) in {where} collapsed (first: line {pos + first_line} "
            f"repeats line {orig + first_line})")
    return ~dup, note


def check_actions(actions: pd.Series, where: str, first_line: int) -> pd.Series:
    """Actions must be one of ACTIONS, exactly (no case folding: a typo should fail, not import as something)."""
    bad = ~actions.isin(ACTIONS)
    if bad.any():
        unknown = sorted({str(a) for a in actions[bad].unique()})
        raise ContractError(
            f"{where}: unknown action(s) {unknown} (allowed: {list(ACTIONS)}); {_first_bad(actions, bad, first_line)}"
        )
    return actions.astype("str")


def event_ids(user_id: pd.Series, item_id: pd.Series, ts: pd.Series) -> pd.Series:
    """``"<user>-<item>-<unix seconds>"``, with ``-1``, ``-2`` ... appended to repeats so ids stay unique.

    Content-based rather than row numbers so re-importing the same data gives the same ids.
    """
    secs = ts.astype("int64") // 1_000_000
    keys = pd.DataFrame({"u": user_id, "i": item_id, "s": secs})
    base = keys.u.astype("str") + "-" + keys.i.astype("str") + "-" + keys.s.astype("str")
    if keys.duplicated().any():  # checked on the integers: grouping 1M strings costs seconds
        rep = keys.groupby(["u", "i", "s"], sort=False).cumcount()
        base = base.where(rep == 0, base + "-" + rep.astype("str"))
    return base


def events_frame(user_id: pd.Series, item_id: pd.Series, action: pd.Series, ts: pd.Series,
                 query: pd.Series | None = None) -> pd.DataFrame:
    """Contract events without context item (imported data has no viewed item): on the ``homefeed`` surface, or on
    ``search`` where ``query`` (aligned with the other columns; None = no query) holds one."""
    # reset_index rather than to_numpy: a tz-aware column would become an object array of Timestamps
    cols = {"user_id": user_id, "item_id": item_id, "action": action, "ts": ts.astype("datetime64[us, UTC]")}
    if query is not None:
        cols["query"] = query.astype(object)
    df = pd.DataFrame({k: v.reset_index(drop=True) for k, v in cols.items()})
    df = df.sort_values(["ts", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    df.insert(0, "event_id", event_ids(df.user_id, df.item_id, df.ts))
    queries = df.pop("query") if query is not None else pd.Series(None, index=df.index, dtype=object)
    df["surface"] = np.where(queries.notna(), "search", "homefeed")
    df["surface"] = df["surface"].astype("str")
    df["context_item_id"] = pd.Series(pd.NA, index=df.index, dtype="Int64")
    df["query"] = queries.where(queries.notna(), None)
    return df


def check_references(events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, where: str) -> None:
    """Every event's user and item must exist in the users and items tables."""
    for col, table in (("user_id", users), ("item_id", items)):
        missing = sorted(int(x) for x in set(events[col].unique()) - set(table[col]))
        if missing:
            raise ContractError(
                f"{where}: {len(missing)} {col}(s) in the events are not in the {col[:4]}s file, e.g. {missing[:5]}"
            )


# ---------------------------------------------------------------- writing: all or nothing


def _exists_nonempty(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    return fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root, detail=False)))


def check_out(out_uri: str, overwrite: bool) -> None:
    """Fail before any work when ``out_uri`` holds something and replacing it was not asked for."""
    fs, root = fsspec.core.url_to_fs(out_uri)
    if not overwrite and _exists_nonempty(fs, root):
        raise ContractError(f"{out_uri}: already exists and is not empty; choose another output or overwrite it")


def write_source(
    out_uri: str,
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    feedback: str,
    extra: dict[str, pd.DataFrame] | None = None,
    overwrite: bool = False,
) -> int:
    """Write a Parquet source (events partitioned by day) beside ``out_uri``, then move it into place.

    ``feedback`` (one of ``towerflow.contract.FEEDBACK_KINDS``) is recorded in the source's ``source.json``, with
    the days between the first and the last event that have none (gaps in the data, which the data gate allows).
    ``extra`` maps relative paths (``id_map/users.parquet``) to plain tables written as they are. On any failure
    the temporary directory is removed, so no partial source is ever left. Returns the number of day partitions.
    """
    check_out(out_uri, overwrite)
    out_uri = str(out_uri).rstrip("/")
    tmp_uri = f"{out_uri}.tmp-{uuid.uuid4().hex[:8]}"
    sink = ParquetSink(tmp_uri)
    fs, final = fsspec.core.url_to_fs(out_uri)
    try:
        day = events.ts.dt.floor("D")
        groups = list(events.groupby(day, sort=True))
        for d, g in progress(groups, desc="write event days"):
            sink.write_events_day(d.date(), g)
        sink.write_users(users)
        sink.write_items(items)
        days = {d.date() for d, _ in groups}
        first = min(days)
        every = {first + timedelta(days=i) for i in range((max(days) - first).days + 1)}
        sink.write_record(feedback, sorted(every - days))
        for rel, df in (extra or {}).items():
            path = f"{sink.root}/{rel}"
            sink.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with sink.fs.open(path, "wb") as f:
                pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f, compression="zstd")
        _publish(fs, sink.root, final, overwrite)
    except BaseException:
        if sink.fs.exists(sink.root):
            sink.fs.rm(sink.root, recursive=True)
        raise
    return len(groups)


def _publish(fs: fsspec.AbstractFileSystem, tmp: str, final: str, overwrite: bool) -> None:
    # A rename is atomic on a local disk; the old source is moved aside first because moving onto an existing
    # directory would nest the new one inside it.
    if fs.exists(final):
        if not overwrite and _exists_nonempty(fs, final):
            raise ContractError(f"{final}: appeared while importing; not replacing it")
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        fs.mv(final, old, recursive=True)
        fs.mv(tmp, final, recursive=True)
        fs.rm(old, recursive=True)
    else:
        fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(tmp, final, recursive=True)


def summarize(
    layout: str, source: str, out_uri: str, events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
    n_days: int, seconds: float, notes: tuple[str, ...] = (), feedback: str = "explicit",
) -> ImportSummary:
    counts = events.action.value_counts()
    return ImportSummary(
        layout=layout, source=source, out_uri=out_uri, n_events=len(events), n_users=len(users),
        n_items=len(items), n_days=n_days, first_ts=events.ts.min().to_pydatetime(),
        last_ts=events.ts.max().to_pydatetime(),
        action_counts=tuple((a, int(counts.get(a, 0))) for a in ACTIONS if counts.get(a, 0)),
        seconds=seconds, notes=notes, feedback=feedback,
    )
