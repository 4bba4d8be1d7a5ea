"""The event contract (docs/architecture.md, "Data contract"): what every source, importer and stage agrees on.

Three tables:

- ``events``: one row per user action, Parquet partitioned by day (``events/dt=YYYY-MM-DD/*.parquet``).
- ``users``: one row per user; ``user_id`` and ``signup_ts`` plus any number of string demographic columns
  (``country``, ``age_bucket``, ``gender``, ``occupation`` ...). The model embeds every extra string column.
- ``items``: one row per item; ``item_id``, ``category`` (primary topic or genre), ``genres`` (``|``-joined, may be
  null), ``title``, ``created_ts``, optional ``features`` (a fixed-length list of floats) and extra columns
  (``year`` for MovieLens) that are kept but not required.

Ids are int64. Importers of string ids factorize them and keep the mapping beside the tables.
Timestamps are UTC, microsecond precision.

A source also records what kind of feedback its events carry (``FEEDBACK_KINDS``, in ``source.json`` beside the
tables): ``explicit`` actions (positives and negatives both logged), ``ratings`` (stars mapped to actions, so low
stars are negatives) or ``implicit`` (only engagements are logged: every event is a positive and no negative can
exist). A source without the record is ``explicit``.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from towerflow.errors import TowerflowError

ACTIONS: tuple[str, ...] = ("impression", "click", "save", "conversion", "skip", "hide")
POSITIVE_ACTIONS: tuple[str, ...] = ("click", "save", "conversion")
NEGATIVE_ACTIONS: tuple[str, ...] = ("skip", "hide")
SURFACES: tuple[str, ...] = ("homefeed", "related", "search")
MAX_QUERY_CHARS = 256  # the longest events.query (search surface only) the data gate and /retrieve accept
FEEDBACK_KINDS: tuple[str, ...] = ("explicit", "ratings", "implicit")
DEFAULT_FEEDBACK = "explicit"


def query_problem(query: object, surface: object, name: str = "query") -> str | None:
    """Why a search ``query`` cannot sit on an event or request of ``surface`` (None: it can): it is a string of
    at most MAX_QUERY_CHARS characters, on the ``search`` surface only. THE rule: ``/retrieve`` and ``POST /events``
    call it, and the data gate (validation/data.py) checks the same two limits over a snapshot's column.
    ``name``: how the message names the field (``context.query``, ``events[3].query``)."""
    if not isinstance(query, str):
        return f"{name} must be a string, got {type(query).__name__}"
    if len(query) > MAX_QUERY_CHARS:
        return f"{name} has {len(query)} characters; at most {MAX_QUERY_CHARS} are allowed"
    if surface != "search":
        return f"{name} is only allowed on the 'search' surface, got surface {surface!r}"
    return None


def check_feedback(feedback: object, where: str = "") -> str:
    """``feedback`` if it is one of FEEDBACK_KINDS, else a ContractError (naming ``where``, if given)."""
    if feedback not in FEEDBACK_KINDS:
        place = f"{where}: " if where else ""
        raise ContractError(f"{place}unknown feedback kind {feedback!r} (allowed: {list(FEEDBACK_KINDS)})")
    return str(feedback)


def negatives_possible(feedback: str) -> bool:
    """Whether a source of this feedback kind can hold negative events (so a positive rate means something)."""
    return check_feedback(feedback) != "implicit"

TS_TYPE = pa.timestamp("us", tz="UTC")

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("surface", pa.string(), nullable=False),
        pa.field("context_item_id", pa.int64(), nullable=True),
        pa.field("query", pa.string(), nullable=True),
    ]
)

USERS_REQUIRED = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("signup_ts", TS_TYPE, nullable=True),
    ]
)

ITEMS_REQUIRED = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("genres", pa.string(), nullable=True),
        pa.field("title", pa.string(), nullable=True),
        pa.field("created_ts", TS_TYPE, nullable=True),
    ]
)

# Optional columns: a source may lack them, every stage works without them; when present they have these types.
# ``request_id`` groups what one request showed (a slate): the ranking examples' unit (tasks/ranking_examples.py).
OPTIONAL_COLUMNS: dict[str, dict[str, pa.DataType]] = {"events": {"request_id": pa.string()}, "users": {},
                                                       "items": {}}

TABLES = ("events", "users", "items")
NULLABLE_STRINGS = ("query", "genres", "title")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": tuple(EVENTS_SCHEMA.names),
    "users": tuple(USERS_REQUIRED.names),
    "items": tuple(ITEMS_REQUIRED.names),
}


class ContractError(TowerflowError, ValueError):
    """A table does not follow the event contract. The message names the table (or file) and the problem."""


def demographic_columns(users: pd.DataFrame) -> list[str]:
    """The user profile fields the model embeds: every column except the id and the signup time."""
    return [c for c in users.columns if c not in ("user_id", "signup_ts")]


def check_columns(df: pd.DataFrame, table: str, where: str = "") -> None:
    """Raise ContractError naming the missing columns of ``table`` (``where`` names the file, if any)."""
    missing = [c for c in REQUIRED_COLUMNS[table] if c not in df.columns]
    if missing:
        place = f" in {where}" if where else ""
        raise ContractError(
            f"{table}{place}: missing required column(s) {missing}; have {list(df.columns)}"
        )


def _to_utc(series: pd.Series, table: str, column: str, where: str) -> pd.Series:
    place = f" in {where}" if where else ""
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        # epoch numbers are ambiguous (s? ms? ns?): importers convert them with their known unit
        raise ContractError(f"{table}.{column}{place}: timestamps must be datetimes or ISO-8601 strings, got numbers")
    try:
        kind = {} if pd.api.types.is_datetime64_any_dtype(series) else {"format": "ISO8601"}
        out = pd.to_datetime(series, utc=True, **kind)
    except (ValueError, TypeError) as exc:
        raise ContractError(f"{table}.{column}{place}: unparseable timestamps ({exc})") from exc
    return out.astype("datetime64[us, UTC]")


def conform(df: pd.DataFrame, table: str, where: str = "") -> pd.DataFrame:
    """Return ``df`` with the contract's columns first, in contract dtypes; extra columns are kept after them.

    Raises ContractError for missing columns, unparseable timestamps or ids that are not integers.
    """
    check_columns(df, table, where)
    df = df.copy()
    place = f" in {where}" if where else ""
    for col in REQUIRED_COLUMNS[table]:
        # a column already in its contract dtype is kept as it is: re-casting costs more than the rest of a small
        # frame's conform (the live event path conforms batches of a few hundred rows)
        dtype = str(df[col].dtype)
        if col.endswith("_ts") or col == "ts":
            if dtype != "datetime64[us, UTC]":
                df[col] = _to_utc(df[col], table, col, where)
        elif col.endswith("_id") and col != "event_id":
            target = "Int64" if col == "context_item_id" else "int64"
            if dtype != target:
                try:
                    df[col] = df[col].astype(target)
                except (ValueError, TypeError) as exc:
                    raise ContractError(f"{table}.{col}{place}: ids must be integers ({exc})") from exc
        elif col in NULLABLE_STRINGS:
            df[col] = df[col].astype(object).where(df[col].notna(), None)
        elif dtype != "str":
            df[col] = df[col].astype("str")
    for col in OPTIONAL_COLUMNS[table]:
        if col in df.columns:  # nullable strings, whatever the source wrote (ints included)
            df[col] = df[col].astype(object).where(df[col].notna(), None)
            df[col] = df[col].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    extra = [c for c in df.columns if c not in REQUIRED_COLUMNS[table]]
    return df[list(REQUIRED_COLUMNS[table]) + extra]


def arrow_schema(df: pd.DataFrame, table: str) -> pa.Schema:
    """The Arrow schema for writing a conformed ``table``: contract fields first, inferred extras after."""
    base = {"events": EVENTS_SCHEMA, "users": USERS_REQUIRED, "items": ITEMS_REQUIRED}[table]
    optional = [pa.field(c, t, nullable=True) for c, t in OPTIONAL_COLUMNS[table].items() if c in df.columns]
    extras = [c for c in df.columns if c not in base.names and c not in OPTIONAL_COLUMNS[table]]
    inferred = pa.Schema.from_pandas(df[extras], preserve_index=False) if extras else pa.schema([])
    fields_ = {f.name: f for f in [*base, *optional, *inferred]}
    return pa.schema([fields_[c] for c in [*base.names, *[c for c in df.columns if c not in base.names]]])
