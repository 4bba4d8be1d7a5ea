"""A generic interaction file -> the event contract.

Input: a CSV (``.csv``; ``.tsv`` is tab-separated) or Parquet (``.parquet``/``.pq``) file with columns

- ``user`` (or ``user_id``) and ``item`` (or ``item_id``): required. Whole numbers without leading zeros are kept
  as ids (they must be >= 0 and fit int64); anything else (strings, "007") is factorized: sorted external ids get
  1, 2, 3 ..., and the mapping is written beside the tables as ``id_map/users.parquet`` (external_id, user_id) /
  ``id_map/items.parquet`` (external_id, item_id). Refused: empty cells and missing-value markers (``nan``,
  ``NaN``, ``NULL`` ...), list-valued cells, boolean columns.
- ``timestamp`` (or ``ts``): optional. Numbers are epoch seconds, or milliseconds / microseconds / nanoseconds
  told by magnitude (converted, with a note); strings are ISO 8601; naive times are UTC. Booleans, a column mixing
  units and times outside [1970, 2262) are refused. Without it the file's row order is the time order: row i
  gets ``SYNTHETIC_EPOCH + i`` seconds.
- ``rating`` or ``action``: optional, at most one. Ratings in [0.5, 5] map as for MovieLens
  (``towerflow.data.movielens.RATING_TO_ACTION``); actions are taken as they are and must be in ``ACTIONS``.
  With neither, every row is a ``click`` and the source is recorded as ``implicit`` feedback (``source.json``):
  no negative can exist, so the data gate does not apply its positive-rate checks. An ``action`` column is
  ``explicit`` feedback, a ``rating`` column ``ratings``; both keep the positive-rate checks.
- ``category``: optional; an item's category is the first value seen for it, else ``"unknown"``.
- ``query``: optional; the search query of the row (at most ``MAX_QUERY_CHARS`` characters, surrounding spaces
  dropped). A row with a query is on the ``search`` surface, a row with an empty cell on ``homefeed``.

Rows identical in every column to an earlier row are collapsed (double ingestion, not a second event); the
summary counts them and names the first. No event has a context item. Users and items tables are synthesized from the
events: ``signup_ts`` / ``created_ts`` = first event time; items have no genres or title.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from towerflow.contract import MAX_QUERY_CHARS, ContractError
from towerflow.data.importing import (
    ImportSummary,
    check_actions,
    check_out,
    check_scalars,
    events_frame,
    exact_duplicates,
    int_ids,
    parse_epoch,
    require_file,
    summarize,
    write_source,
)
from towerflow.data.movielens import rating_to_action
from towerflow.progress import step

SYNTHETIC_EPOCH = pd.Timestamp("2000-01-01", tz="UTC")
ALIASES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id"),
    "item": ("item", "item_id"),
    "timestamp": ("timestamp", "ts"),
    "rating": ("rating",),
    "action": ("action",),
    "category": ("category",),
    "query": ("query",),
}


def _read(file: str) -> pd.DataFrame:
    require_file(file)
    ext = os.path.splitext(file)[1].lower()
    try:
        if ext in (".parquet", ".pq"):
            df = pq.read_table(file).to_pandas()
        elif ext in (".csv", ".tsv"):
            df = pd.read_csv(file, sep="\t" if ext == ".tsv" else ",", dtype="str", keep_default_na=False,
                             skipinitialspace=True)
        else:
            raise ContractError(f"{file}: unknown file type {ext!r}; expected .csv, .tsv, .parquet or .pq")
    except (pa.ArrowInvalid, OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ContractError(f"{file}: cannot read ({exc})") from exc
    if df.empty:
        raise ContractError(f"{file}: empty file (no rows)")
    return df


def _column(df: pd.DataFrame, name: str, file: str) -> str | None:
    found = [c for c in ALIASES[name] if c in df.columns]
    if len(found) > 1:
        raise ContractError(f"{file}: both {found[0]!r} and {found[1]!r} given; keep one")
    return found[0] if found else None


def _ids(values: pd.Series, file: str, name: str, first_line: int) -> tuple[pd.Series, pd.DataFrame | None]:
    """Whole-number ids stay; anything else is factorized (sorted, from 1) and its mapping returned.

    ``name`` is ``user`` or ``item``; errors name the file's column (``values.name``).
    """
    ids = int_ids(values, file, str(values.name), first_line)
    if ids is not None:
        return ids, None
    codes, uniques = pd.factorize(values.astype("str").str.strip(), sort=True)
    mapping = pd.DataFrame({"external_id": pd.Series(uniques, dtype="str"),
                            f"{name}_id": np.arange(1, len(uniques) + 1, dtype="int64")})
    return pd.Series(codes + 1, index=values.index, dtype="int64"), mapping


def _queries(values: pd.Series, file: str, first_line: int) -> pd.Series:
    """Query cells -> stripped strings, None for an empty cell; ContractError naming the first line over the limit."""
    if not (pd.api.types.is_string_dtype(values) or values.dtype == object):
        raise ContractError(f"{file}: column 'query' must hold text, got {values.dtype}")
    text = values.astype(object).where(values.notna(), "").map(lambda v: str(v).strip())
    long = np.flatnonzero(text.str.len().to_numpy() > MAX_QUERY_CHARS)
    if len(long):
        raise ContractError(f"{file}: line {first_line + int(long[0])}: query of {len(text.iloc[long[0]])} characters; "
                            f"at most {MAX_QUERY_CHARS} are allowed ({len(long)} row(s) over)")
    return text.where(text != "", None)


def _timestamps(values: pd.Series, file: str, column: str, first_line: int) -> tuple[pd.Series, str | None]:
    """Datetimes, epoch numbers (unit told by magnitude) or ISO 8601 strings -> (UTC, a note when not seconds).

    The first value decides between numbers and text.
    """
    check_scalars(values, file, column, first_line, "times")
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        if values.isna().any():
            pos = int(values.isna().to_numpy().nonzero()[0][0])
            raise ContractError(f"{file}: missing timestamp in {column} on line {pos + first_line}")
        ts = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        return ts.astype("datetime64[us, UTC]"), None
    if pd.api.types.is_numeric_dtype(values.dtype) or pd.notna(pd.to_numeric(values.iloc[0], errors="coerce")):
        ts, unit = parse_epoch(values, file, column, first_line)
        return ts, (None if unit == "seconds" else f"{column}: epoch {unit} (told by magnitude), converted")
    ts = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
    if ts.isna().any():
        pos = int(ts.isna().to_numpy().nonzero()[0][0])
        raise ContractError(
            f"{file}: unparseable timestamps in {column} (expected epoch numbers or ISO 8601); "
            f"line {pos + first_line}: {values.iloc[pos]!r}"
        )
    return ts.astype("datetime64[us, UTC]"), None


def import_interactions(file: str, out_uri: str, overwrite: bool = False) -> ImportSummary:
    """Convert a ``user,item[,timestamp][,rating|action]`` CSV or Parquet file into a Parquet source.

    See the module docstring for the columns, id factorization and the synthetic time order. Everything is parsed
    and checked before anything is written; the source is written beside ``out_uri`` and moved into place, so a
    failure leaves no partial output. ``out_uri`` must not hold anything unless ``overwrite``.

    Raises ContractError naming the file and problem: missing or empty file, missing user/item columns, both
    rating and action, unparseable or boolean timestamps, mixed epoch units, missing, negative, list-valued or
    out-of-int64 ids, ratings outside [0.5, 5], unknown actions.
    """
    t0 = time.perf_counter()
    check_out(out_uri, overwrite)
    with step(f"read interactions from {file}"):
        df = _read(file)
    cols = {name: _column(df, name, file) for name in ALIASES}
    missing = [name for name in ("user", "item") if cols[name] is None]
    if missing:
        raise ContractError(f"{file}: missing required column(s) {missing}; have {list(df.columns)}")
    if cols["rating"] and cols["action"]:
        raise ContractError(f"{file}: has both 'rating' and 'action'; keep one")
    notes: list[str] = []
    first_line = 1 if file.lower().endswith((".parquet", ".pq")) else 2  # a CSV's header is line 1; Parquet: row

    user_id, user_map = _ids(df[cols["user"]], file, "user", first_line)
    item_id, item_map = _ids(df[cols["item"]], file, "item", first_line)
    if cols["timestamp"]:
        ts, note = _timestamps(df[cols["timestamp"]], file, cols["timestamp"], first_line)
        notes += [note] if note else []
    else:
        ts = pd.Series(SYNTHETIC_EPOCH + pd.to_timedelta(np.arange(len(df)), unit="s")).astype("datetime64[us, UTC]")
        notes.append(f"no timestamp column: row order, 1 s apart from {SYNTHETIC_EPOCH:%Y-%m-%d}")
    if cols["action"]:
        action, feedback = check_actions(df[cols["action"]].astype("str"), file, first_line), "explicit"
    elif cols["rating"]:
        action, feedback = rating_to_action(df[cols["rating"]], file, first_line), "ratings"
    else:
        action, feedback = pd.Series(["click"] * len(df), dtype="str"), "implicit"
        notes.append("no rating or action column: every row is a click")
    query = _queries(df[cols["query"]], file, first_line) if cols["query"] else None
    keep, note = exact_duplicates(df[[c for c in cols.values() if c]], file, first_line)
    if note:
        notes.append(note)
        user_id, item_id, action, ts, df = user_id[keep], item_id[keep], action[keep], ts[keep], df[keep]
    if query is not None:
        query = query[keep] if note else query
        notes.append(f"query column: {int(query.notna().sum()):,} rows on the search surface")
    events = events_frame(user_id, item_id, action, ts, query)

    seen = pd.DataFrame({"user_id": user_id.to_numpy(), "item_id": item_id.to_numpy(), "ts": ts.to_numpy()})
    users = seen.groupby("user_id", as_index=False).ts.min().rename(columns={"ts": "signup_ts"})
    items = seen.groupby("item_id", as_index=False).ts.min().rename(columns={"ts": "created_ts"})
    if cols["category"]:
        cat = df[cols["category"]].astype("str").str.strip().replace("", pd.NA)
        first = pd.Series(cat.to_numpy(), index=item_id.to_numpy()).dropna().groupby(level=0).first()
        items["category"] = items.item_id.map(first).fillna("unknown").astype("str")
    else:
        items["category"] = "unknown"
    items["genres"], items["title"] = None, None

    extra = {}
    for name, mapping in (("users", user_map), ("items", item_map)):
        if mapping is not None:
            extra[f"id_map/{name}.parquet"] = mapping
            notes.append(f"{name[:-1]} ids factorized: id_map/{name}.parquet")
    with step(f"write source {out_uri}") as info:
        n_days = write_source(out_uri, events, users, items, feedback, extra=extra, overwrite=overwrite)
        info["note"] = f"{len(events):,} events in {n_days} day partitions"
    return summarize(f"interactions ({os.path.basename(file)})", file, out_uri, events, users, items, n_days,
                     time.perf_counter() - t0, tuple(notes), feedback)
