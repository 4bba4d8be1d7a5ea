"""MovieLens -> the event contract, from any of its three common layouts.

Layouts (detected from the file names in the directory):

- ``ml-100k``: ``u.data`` (tab: user item rating unix_ts), ``u.user`` (``|``: id|age|gender|occupation|zip),
  ``u.item`` (``|``, latin-1: id|title|release date|video date|IMDb URL|19 genre flags).
- ``recbole``: RecBole atomic files ``<name>.inter`` / ``.user`` / ``.item``, tab-separated with a
  ``field:type`` header (``user_id:token  item_id:token  rating:float  timestamp:float``; users ``user_id age gender
  occupation zip_code``; items ``item_id movie_title release_year class``, ``class`` space-separated genres).
- ``ml-1m``: ``ratings.dat`` (user::item::rating::ts), ``users.dat`` (user::gender::age_code::occupation_code::zip),
  ``movies.dat`` (item::title (year)::Genre|Genre, latin-1).

Mapping to the contract (the same for every layout):

- events: ``RATING_TO_ACTION`` below (5 conversion, 4 save, 3 click, 2 skip, 1 hide); half stars round up
  (3.5 -> save); surface ``homefeed``; no context item, no query; ``event_id`` = ``user-item-unixts``.
- users: ``age_bucket`` (``AGE_BUCKETS``; the 1M age codes fall in the same buckets), ``gender``, ``occupation``
  (1M codes become the names in ``ML1M_OCCUPATIONS``); zip code is dropped (nearly unique, nothing to embed).
  ``signup_ts`` = the user's first rating (MovieLens has no sign-up date).
- items: ``title`` as in the file, ``genres`` ``|``-joined in file order (null when the only genre is "unknown"),
  ``category`` = first genre (``"unknown"`` when none), ``year`` (nullable int: release date, else the title's
  ``(YYYY)``, else null), ``created_ts`` = release date (100K) or 1 January of ``year``, else null.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
import time
from typing import NamedTuple

import numpy as np
import pandas as pd

from towerflow.contract import ContractError
from towerflow.data.importing import (
    ImportSummary,
    check_out,
    check_references,
    events_frame,
    exact_duplicates,
    parse_epoch,
    parse_ids,
    parse_ints,
    require_file,
    summarize,
    write_source,
)
from towerflow.progress import step

RATING_TO_ACTION: dict[int, str] = {5: "conversion", 4: "save", 3: "click", 2: "skip", 1: "hide"}

# (upper bound exclusive, label); chosen to match MovieLens-1M's own age codes 1/18/25/35/45/50/56.
AGE_BUCKETS: tuple[tuple[float, str], ...] = (
    (18, "under-18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"), (np.inf, "56+"),
)

ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

ML1M_OCCUPATIONS: tuple[str, ...] = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)

_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def rating_to_action(rating: pd.Series, where: str, first_line: int) -> pd.Series:
    """Star ratings in [0.5, 5] -> actions by ``RATING_TO_ACTION``; half stars round up (0.5 -> 1, 3.5 -> 4)."""
    try:
        num = rating.astype("float64")
    except (ValueError, TypeError):
        num = pd.to_numeric(rating, errors="coerce")
    bad = num.isna() | (num < 0.5) | (num > 5)
    if bad.any():
        pos = int(bad.to_numpy().nonzero()[0][0])
        raise ContractError(
            f"{where}: ratings must be numbers in [0.5, 5]; line {pos + first_line}: {rating.iloc[pos]!r}"
        )
    stars = np.floor(num.to_numpy(dtype="float64") + 0.5).astype("int64")
    return pd.Series(pd.Series(stars).map(RATING_TO_ACTION).to_numpy(), index=rating.index, dtype="str")


def age_bucket(age: pd.Series, where: str, first_line: int) -> pd.Series:
    """Ages (years, or 1M age codes) -> ``AGE_BUCKETS`` labels; empty -> ``"unknown"``."""
    blank = age.isna() | (age.astype("str").str.strip() == "")
    num = pd.to_numeric(age.where(~blank), errors="coerce")
    bad = num.isna() & ~blank
    if bad.any():
        pos = int(bad.to_numpy().nonzero()[0][0])
        raise ContractError(f"{where}: age must be a number; line {pos + first_line}: {age.iloc[pos]!r}")
    bounds = [b for b, _ in AGE_BUCKETS]
    idx = np.searchsorted(bounds, num.fillna(0).to_numpy(), side="right")
    labels = np.array([label for _, label in AGE_BUCKETS], dtype=object)[np.minimum(idx, len(bounds) - 1)]
    return pd.Series(np.where(blank, "unknown", labels), index=age.index, dtype="str")


def _text(path: str, encoding: str) -> str:
    require_file(path)
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path}: not {encoding} text ({exc})") from exc


def _parse(text: str, path: str, sep: str, header: bool, names: list[str] | None = None) -> pd.DataFrame:
    """All columns as strings, so errors can quote the raw value."""
    try:
        df = pd.read_csv(
            io.StringIO(text), sep=sep, header=0 if header else None, names=names, dtype="str",
            keep_default_na=False, quoting=csv.QUOTE_NONE, engine="c", index_col=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ContractError(f"{path}: cannot parse ({exc})") from exc
    if df.empty:
        raise ContractError(f"{path}: empty file (no rows)")
    return df


def _atomic(path: str) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated with a ``name:type`` header; columns renamed to ``name``."""
    df = _parse(_text(path, "utf-8"), path, "\t", header=True)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def _require(df: pd.DataFrame, path: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ContractError(f"{path}: missing required column(s) {missing}; have {list(df.columns)}")


def _fields(path: str, names: list[str], sep: str, encoding: str = "utf-8") -> pd.DataFrame:
    """A headerless file whose every line must have exactly ``len(names)`` fields."""
    text = _text(path, encoding)
    if sep == "::":  # the C parser takes one-character separators; "::" never occurs inside a MovieLens field
        text, sep = text.replace("::", "\t"), "\t"
    lines = pd.Series(text.splitlines(), dtype="str")
    n_fields = lines.str.count(re.escape(sep)) + 1
    wrong = (n_fields != len(names)) & (lines != "")
    if wrong.any():
        pos = int(wrong.to_numpy().nonzero()[0][0])
        raise ContractError(
            f"{path}: line {pos + 1} has {n_fields.iloc[pos]} fields, expected {len(names)} ({'|'.join(names)})"
        )
    return _parse(text, path, sep, header=False, names=names)


def detect_layout(path: str) -> tuple[str, dict[str, str]]:
    """Which MovieLens layout ``path`` (a directory, or a file inside one) holds, and its ratings/users/items."""
    if not os.path.exists(path):
        raise ContractError(f"{path}: no such file or directory")
    d = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.exists(os.path.join(d, "u.data")):
        return "ml-100k", {k: os.path.join(d, f) for k, f in (("ratings", "u.data"), ("users", "u.user"),
                                                               ("items", "u.item"))}
    inter = [path] if path.endswith(".inter") else sorted(glob.glob(os.path.join(d, "*.inter")))
    if len(inter) > 1:
        raise ContractError(f"{d}: several RecBole .inter files {inter}; pass the one to import")
    if inter:
        stem = inter[0][: -len(".inter")]
        return "recbole", {"ratings": stem + ".inter", "users": stem + ".user", "items": stem + ".item"}
    if os.path.exists(os.path.join(d, "ratings.dat")):
        return "ml-1m", {k: os.path.join(d, f) for k, f in (("ratings", "ratings.dat"), ("users", "users.dat"),
                                                             ("items", "movies.dat"))}
    raise ContractError(
        f"{d}: no MovieLens files found; expected u.data (100K), <name>.inter (RecBole atomic) or ratings.dat (1M)"
    )


class _Raw(NamedTuple):
    """One layout read: ratings and users still as strings (parsed in one place), items already in contract form."""

    ratings: pd.DataFrame  # user_id, item_id, rating, timestamp
    users: pd.DataFrame  # user_id, age, gender
    occupation: pd.Series  # names, one per users row
    items: pd.DataFrame
    first_line: int  # file line of the first data row: 2 under a header, else 1


def _genre_fields(genres: list[list[str]]) -> tuple[list[str], list[str | None]]:
    """Genre lists -> (category, genres string); "unknown" is MovieLens's "no genre" marker, not a genre."""
    kept = [[g for g in gs if g and g != "unknown"] for gs in genres]
    return [k[0] if k else "unknown" for k in kept], ["|".join(k) if k else None for k in kept]


def _year(text: pd.Series) -> pd.Series:
    """4-digit years; anything else (RecBole writes "unkonwn" for one film) is missing, not an error."""
    return pd.to_numeric(text.where(text.str.fullmatch(r"\d{4}")), errors="coerce").astype("Int64")


def _title_year(title: pd.Series) -> pd.Series:
    return _year(title.str.extract(_YEAR_IN_TITLE, expand=False).fillna(""))


def _year_start(year: pd.Series) -> pd.Series:
    """1 January of each year (UTC); NaT where the year is missing."""
    ts = pd.to_datetime(year.astype("string"), format="%Y", utc=True)
    return ts.astype("datetime64[us, UTC]")


def _items(item_id: pd.Series, title: pd.Series, genres: list[list[str]], year: pd.Series,
           created_ts: pd.Series) -> pd.DataFrame:
    category, genre_str = _genre_fields(genres)
    return pd.DataFrame(
        {
            "item_id": item_id.to_numpy(), "category": category, "genres": genre_str,
            "title": title.to_numpy(), "created_ts": created_ts.to_numpy(), "year": year.to_numpy(),
        }
    ).astype({"year": "Int64"})


def _read_ml100k(files: dict[str, str]) -> _Raw:
    r = _fields(files["ratings"], ["user_id", "item_id", "rating", "timestamp"], "\t")
    u = _fields(files["users"], ["user_id", "age", "gender", "occupation", "zip"], "|")
    flags = list(ML100K_GENRES)
    it = _fields(files["items"], ["item_id", "title", "release_date", "video_date", "url", *flags], "|", "latin-1")
    fl = it[flags]
    if not fl.isin(["0", "1"]).all().all():
        raise ContractError(f"{files['items']}: the 19 genre flags must be 0 or 1")
    genres = [[g for g, on in zip(flags, row, strict=True) if on == "1"] for row in fl.itertuples(index=False)]
    blank = it.release_date == ""
    released = pd.to_datetime(it.release_date.where(~blank), format="%d-%b-%Y", errors="coerce", utc=True)
    bad = released.isna() & ~blank
    if bad.any():
        pos = int(bad.to_numpy().nonzero()[0][0])
        raise ContractError(f"{files['items']}: unparseable release date on line {pos + 1}: {it.release_date.iloc[pos]!r}")
    year = released.dt.year.astype("Int64").fillna(_title_year(it.title))
    created = released.astype("datetime64[us, UTC]").fillna(_year_start(year))
    items = _items(parse_ids(it.item_id, files["items"], "item_id", 1), it.title, genres, year, created)
    return _Raw(r, u, u.occupation, items, 1)


def _read_recbole(files: dict[str, str]) -> _Raw:
    r = _atomic(files["ratings"])
    _require(r, files["ratings"], ("user_id", "item_id", "rating", "timestamp"))
    u = _atomic(files["users"])
    _require(u, files["users"], ("user_id", "age", "gender", "occupation"))
    it = _atomic(files["items"])
    genre_col = "class" if "class" in it.columns else "genre"  # ml-100k names it class, ml-1m genre
    _require(it, files["items"], ("item_id", "movie_title", "release_year", genre_col))
    year = _year(it.release_year)
    items = _items(parse_ids(it.item_id, files["items"], "item_id", 2), it.movie_title,
                   [g.split() for g in it[genre_col]], year, _year_start(year))
    return _Raw(r, u, u.occupation, items, 2)


def _read_ml1m(files: dict[str, str]) -> _Raw:
    r = _fields(files["ratings"], ["user_id", "item_id", "rating", "timestamp"], "::")
    u = _fields(files["users"], ["user_id", "gender", "age", "occupation", "zip"], "::")
    code = parse_ints(u.occupation, files["users"], "occupation", 1)
    bad = ~code.between(0, len(ML1M_OCCUPATIONS) - 1)
    if bad.any():
        pos = int(bad.to_numpy().nonzero()[0][0])
        raise ContractError(f"{files['users']}: occupation code must be 0-20; line {pos + 1}: {u.occupation.iloc[pos]!r}")
    occupation = pd.Series(np.array(ML1M_OCCUPATIONS, dtype=object)[code.to_numpy()], dtype="str")
    m = _fields(files["items"], ["item_id", "title", "genres"], "::", "latin-1")
    year = _title_year(m.title)
    items = _items(parse_ids(m.item_id, files["items"], "item_id", 1), m.title,
                   [g.split("|") for g in m.genres], year, _year_start(year))
    return _Raw(r, u, occupation, items, 1)


_READERS = {"ml-100k": _read_ml100k, "recbole": _read_recbole, "ml-1m": _read_ml1m}


def import_movielens(path: str, out_uri: str, overwrite: bool = False) -> ImportSummary:
    """Convert a MovieLens directory (100K, RecBole atomic or 1M layout) into a Parquet source at ``out_uri``.

    Ratings become actions by ``RATING_TO_ACTION``: 5 -> conversion, 4 -> save, 3 -> click, 2 -> skip,
    1 -> hide (half stars round up). See the module docstring for users and items. Everything is parsed and
    checked before anything is written, and the source is written beside ``out_uri`` and moved into place, so a
    failure leaves no partial output. ``out_uri`` must not hold anything unless ``overwrite``.

    Raises ContractError naming the file and problem: missing path or file, empty file, missing columns or fields,
    unparseable, negative or out-of-int64 ids, unparseable ratings or timestamps (epoch units are told by
    magnitude), events whose user or item is not in the users or items file. Exact duplicate rating lines are
    collapsed and counted in the summary.
    """
    t0 = time.perf_counter()
    check_out(out_uri, overwrite)
    layout, files = detect_layout(path)
    with step(f"read MovieLens ({layout}) from {path}"):
        raw = _READERS[layout](files)
    rf, uf, line = files["ratings"], files["users"], raw.first_line
    r, u = raw.ratings, raw.users
    parsed = [parse_ids(r.user_id, rf, "user_id", line), parse_ids(r.item_id, rf, "item_id", line),
              rating_to_action(r.rating, rf, line), parse_epoch(r.timestamp, rf, "timestamp", line)[0]]
    keep, note = exact_duplicates(r[["user_id", "item_id", "rating", "timestamp"]], rf, line)
    events = events_frame(*(col[keep] for col in parsed))
    users = pd.DataFrame(
        {
            "user_id": parse_ids(u.user_id, uf, "user_id", line).to_numpy(),
            "age_bucket": age_bucket(u.age, uf, line).to_numpy(),
            "gender": u.gender.replace("", "unknown").to_numpy(),
            "occupation": raw.occupation.replace("", "unknown").to_numpy(),
        }
    ).astype({"age_bucket": "str", "gender": "str", "occupation": "str"})
    users.insert(1, "signup_ts", users.user_id.map(events.groupby("user_id").ts.min()).astype("datetime64[us, UTC]"))
    for key, df, f in (("user_id", users, uf), ("item_id", raw.items, files["items"])):
        dup = df[key].duplicated()
        if dup.any():
            raise ContractError(f"{f}: duplicate {key} {int(df[key][dup].iloc[0])}")
    check_references(events, users, raw.items, rf)
    with step(f"write source {out_uri}") as info:
        n_days = write_source(out_uri, events, users, raw.items, "ratings", overwrite=overwrite)
        info["note"] = f"{len(events):,} events in {n_days} day partitions"
    return summarize(f"MovieLens ({layout})", path, out_uri, events, users, raw.items, n_days,
                     time.perf_counter() - t0, (note,) if note else (), feedback="ratings")
