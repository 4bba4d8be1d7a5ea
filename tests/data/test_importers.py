"""Importers on small hand-written files in each layout: exact mapped values, and every bad input named clearly."""

from __future__ import annotations

import json
import os
import zipfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.scripts import load_script
from towerflow.cli import main
from towerflow.contract import ContractError
from towerflow.data.importing import write_source
from towerflow.data.interactions import import_interactions
from towerflow.data.movielens import import_movielens
from towerflow.data.source import ParquetSource

T0 = 883612800  # 1998-01-01 00:00:00 UTC
# One rating of every star value, over two days: (user, item, rating, unix ts).
RATINGS = [(1, 10, 5, T0), (1, 20, 4, T0 + 3600), (2, 10, 3, T0 + 7200), (2, 30, 2, T0 + 86400),
           (3, 20, 1, T0 + 90000)]
EXPECTED_EVENTS = [
    ("1-10-883612800", 1, 10, "conversion", "1998-01-01 00:00"),
    ("1-20-883616400", 1, 20, "save", "1998-01-01 01:00"),
    ("2-10-883620000", 2, 10, "click", "1998-01-01 02:00"),
    ("2-30-883699200", 2, 30, "skip", "1998-01-02 00:00"),
    ("3-20-883702800", 3, 20, "hide", "1998-01-02 01:00"),
]
FLAGS = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
         "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _flags(*on: str) -> str:
    return "|".join("1" if g in on else "0" for g in FLAGS)


def write_ml100k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|55105\n")
    kids = _flags("Animation", "Children's", "Comedy")
    (d / "u.item").write_bytes(
        (f"10|Toy Story (1995)|01-Jan-1995||http://x|{kids}\n"
         f"20|Misérables, Les (1995)|15-Dec-1995||http://y|{_flags('Drama', 'Musical')}\n"
         f"30|unknown||||{_flags('unknown')}\n").encode("latin-1")
    )
    return d


def write_recbole(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS)
    )
    (d / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n3\t17\tM\tstudent\t55105\n"
    )
    (d / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n"
        "20\tMisérables, Les\t1995\tDrama Musical\n"
        "30\tunkonwn\tunkonwn\tunknown\n"
    )
    return d


def write_ml1m(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    (d / "users.dat").write_text("1::M::18::17::85711\n2::F::50::0::94043\n3::M::1::10::55105\n")
    (d / "movies.dat").write_bytes(
        "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Misérables, Les (1995)::Drama|Musical\n"
        "30::Heat (1995)::Action|Crime|Thriller\n".encode("latin-1")
    )
    return d


def _events(src: ParquetSource) -> list[tuple]:
    days = src.days()  # read exactly the written days (a wide window would probe thousands of partitions)
    start = datetime.combine(days[0], datetime.min.time(), tzinfo=UTC)
    ev = src.read_events(start, datetime.combine(days[-1], datetime.min.time(), tzinfo=UTC) + timedelta(days=1))
    assert (ev.surface == "homefeed").all() and ev.context_item_id.isna().all() and ev["query"].isna().all()
    return [(r.event_id, r.user_id, r.item_id, r.action, f"{r.ts:%Y-%m-%d %H:%M}") for r in ev.itertuples()]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


# ------------------------------------------------------------------------------------------------ MovieLens layouts


def test_ml100k_maps_ratings_users_and_items(tmp_path):
    out = tmp_path / "src"
    s = import_movielens(str(write_ml100k(tmp_path / "ml")), str(out))
    src = ParquetSource(str(out))
    assert _events(src) == EXPECTED_EVENTS
    assert src.days() == [date(1998, 1, 1), date(1998, 1, 2)]
    users = src.read_users().set_index("user_id")
    assert users.loc[2, "occupation"] == "other"
    assert users.age_bucket.tolist() == ["18-24", "50-55", "under-18"]
    assert users.gender.tolist() == ["M", "F", "M"]
    assert "zip" not in users.columns
    assert users.loc[2, "signup_ts"] == pd.Timestamp("1998-01-01 02:00", tz="UTC")  # first rating
    items = src.read_items().set_index("item_id")
    assert items.loc[10, "genres"] == "Animation|Children's|Comedy"
    assert items.loc[10, "category"] == "Animation"
    assert items.loc[20, "title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert items.loc[20, "created_ts"] == pd.Timestamp("1995-12-15", tz="UTC")
    assert items.year.isna().tolist() == [False, False, True] and items.year.iloc[:2].tolist() == [1995, 1995]
    assert items.loc[30, "category"] == "unknown" and items.loc[30, "genres"] is None
    assert pd.isna(items.loc[30, "created_ts"])
    assert (s.layout, s.n_events, s.n_users, s.n_items, s.n_days) == ("MovieLens (ml-100k)", 5, 3, 3, 2)
    assert s.action_counts == (("click", 1), ("save", 1), ("conversion", 1), ("skip", 1), ("hide", 1))
    assert s.first_ts == datetime(1998, 1, 1, tzinfo=UTC) and s.last_ts == datetime(1998, 1, 2, 1, tzinfo=UTC)
    text = str(s)
    assert "events 5" in text and "1998-01-01 00:00:00 .. 1998-01-02 01:00:00 UTC" in text and "save 1" in text


def test_recbole_atomic_gives_the_same_events_and_users_as_ml100k(tmp_path):
    import_movielens(str(write_ml100k(tmp_path / "a")), str(tmp_path / "from_100k"))
    s = import_movielens(str(write_recbole(tmp_path / "b")), str(tmp_path / "from_recbole"))
    a, b = ParquetSource(str(tmp_path / "from_100k")), ParquetSource(str(tmp_path / "from_recbole"))
    assert s.layout == "MovieLens (recbole)"
    assert _events(b) == EXPECTED_EVENTS
    pd.testing.assert_frame_equal(a.read_users(), b.read_users())
    items = b.read_items().set_index("item_id")
    assert items.loc[10, "genres"] == "Animation|Children's|Comedy" and items.loc[10, "title"] == "Toy Story"
    assert items.loc[20, "created_ts"] == pd.Timestamp("1995-01-01", tz="UTC")  # year only: 1 January
    assert int(items.loc[20, "year"]) == 1995
    assert pd.isna(items.loc[30, "year"]) and items.loc[30, "category"] == "unknown"  # "unkonwn" is missing


def test_ml1m_decodes_age_and_occupation_codes(tmp_path):
    s = import_movielens(str(write_ml1m(tmp_path / "ml")), str(tmp_path / "src"))
    src = ParquetSource(str(tmp_path / "src"))
    assert s.layout == "MovieLens (ml-1m)"
    assert _events(src) == EXPECTED_EVENTS
    users = src.read_users().set_index("user_id")
    assert users.occupation.tolist() == ["technician/engineer", "other", "K-12 student"]
    assert users.age_bucket.tolist() == ["18-24", "50-55", "under-18"]  # age codes 18, 50, 1
    items = src.read_items().set_index("item_id")
    assert items.loc[30, "genres"] == "Action|Crime|Thriller" and items.loc[30, "category"] == "Action"
    assert items.loc[20, "title"] == "Misérables, Les (1995)" and int(items.loc[20, "year"]) == 1995


def test_half_star_ratings_round_up(tmp_path):
    d = write_ml100k(tmp_path / "ml")
    (d / "u.data").write_text(f"1\t10\t3.5\t{T0}\n1\t20\t0.5\t{T0 + 1}\n")
    import_movielens(str(d), str(tmp_path / "src"))
    assert [e[3] for e in _events(ParquetSource(str(tmp_path / "src")))] == ["save", "hide"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    ml, out = write_ml100k(tmp_path / "ml"), tmp_path / "src"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's")
    with pytest.raises(ContractError, match="already exists"):
        import_movielens(str(ml), str(out))
    assert (out / "keep.txt").exists()
    import_movielens(str(ml), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "items.parquet").exists()
    assert _leftovers(out) == ["src"]


# ------------------------------------------------------------------------------------------------ generic importer


def test_csv_with_string_ids_is_factorized_with_an_id_map(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("user,item,timestamp,rating\n"
                 "alice,m-2,2024-03-01T10:00:00Z,4\n"
                 "bob,m-1,2024-03-01T11:00:00Z,5\n"
                 "alice,m-1,2024-03-02T09:30:00+01:00,2\n")
    out = tmp_path / "src"
    s = import_interactions(str(f), str(out))
    src = ParquetSource(str(out))
    assert _events(src) == [
        ("1-2-1709287200", 1, 2, "save", "2024-03-01 10:00"),
        ("2-1-1709290800", 2, 1, "conversion", "2024-03-01 11:00"),
        ("1-1-1709368200", 1, 1, "skip", "2024-03-02 08:30"),
    ]
    users = pq.read_table(out / "id_map" / "users.parquet").to_pandas()
    items = pq.read_table(out / "id_map" / "items.parquet").to_pandas()
    assert users.to_dict("list") == {"external_id": ["alice", "bob"], "user_id": [1, 2]}
    assert items.to_dict("list") == {"external_id": ["m-1", "m-2"], "item_id": [1, 2]}
    catalog = src.read_items()
    assert catalog.category.tolist() == ["unknown", "unknown"]
    assert catalog.created_ts.tolist() == [pd.Timestamp("2024-03-01 11:00", tz="UTC"),
                                           pd.Timestamp("2024-03-01 10:00", tz="UTC")]
    assert src.read_users().signup_ts.tolist() == [pd.Timestamp("2024-03-01 10:00", tz="UTC"),
                                                   pd.Timestamp("2024-03-01 11:00", tz="UTC")]
    assert (s.n_events, s.n_users, s.n_items, s.n_days) == (3, 2, 2, 2)
    assert "user ids factorized: id_map/users.parquet" in str(s)


def test_parquet_with_action_column_keeps_int_ids_and_category(tmp_path):
    f = tmp_path / "log.parquet"
    pq.write_table(pa.table({
        "user_id": pa.array([7, 7, 9], pa.int64()),
        "item_id": pa.array([100, 200, 100], pa.int64()),
        "ts": pa.array([datetime(2025, 5, 1, 12), datetime(2025, 5, 1, 13), datetime(2025, 5, 3, 8)],
                       pa.timestamp("s")),
        "action": ["impression", "hide", "conversion"],
        "category": ["shoes", "hats", "boots"],
    }), f)
    s = import_interactions(str(f), str(tmp_path / "src"))
    src = ParquetSource(str(tmp_path / "src"))
    assert _events(src) == [
        ("7-100-1746100800", 7, 100, "impression", "2025-05-01 12:00"),
        ("7-200-1746104400", 7, 200, "hide", "2025-05-01 13:00"),
        ("9-100-1746259200", 9, 100, "conversion", "2025-05-03 08:00"),
    ]
    assert src.read_items().category.tolist() == ["shoes", "hats"]  # item 100: first value seen
    assert not (tmp_path / "src" / "id_map").exists()
    assert s.action_counts == (("impression", 1), ("conversion", 1), ("hide", 1))


def test_without_timestamp_row_order_is_time_order(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("user,item,action\n2,5,click\n1,5,save\n2,007,skip\n")
    import_interactions(str(f), str(tmp_path / "src"))
    assert _events(ParquetSource(str(tmp_path / "src"))) == [
        ("2-2-946684800", 2, 2, "click", "2000-01-01 00:00"),  # "007" forces item factorization: 007 -> 1, 5 -> 2
        ("1-2-946684801", 1, 2, "save", "2000-01-01 00:00"),
        ("2-1-946684802", 2, 1, "skip", "2000-01-01 00:00"),
    ]
    ts = ParquetSource(str(tmp_path / "src")).read_events(datetime(2000, 1, 1, tzinfo=UTC),
                                                          datetime(2000, 1, 2, tzinfo=UTC)).ts
    assert ts.tolist() == [pd.Timestamp("2000-01-01 00:00:00", tz="UTC") + pd.Timedelta(seconds=i) for i in range(3)]
    ids = pq.read_table(tmp_path / "src" / "id_map" / "items.parquet").to_pandas()
    assert ids.to_dict("list") == {"external_id": ["007", "5"], "item_id": [1, 2]}
    assert not (tmp_path / "src" / "id_map" / "users.parquet").exists()


def test_repeated_events_get_distinct_ids(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("user,item,timestamp,action\n1,2,1000000000,click\n1,2,1000000000,save\n")
    import_interactions(str(f), str(tmp_path / "src"))
    assert [e[0] for e in _events(ParquetSource(str(tmp_path / "src")))] == ["1-2-1000000000", "1-2-1000000000-1"]


@pytest.mark.parametrize(
    ("header", "rows", "feedback"),
    [
        ("user,item,timestamp", ["1,2,1000000000", "2,2,1000000060"], "implicit"),
        ("user,item,timestamp,rating", ["1,2,1000000000,5", "2,2,1000000060,1"], "ratings"),
        ("user,item,timestamp,action", ["1,2,1000000000,click", "2,2,1000000060,skip"], "explicit"),
    ],
)
def test_interactions_record_the_feedback_kind(tmp_path, header, rows, feedback):
    f = tmp_path / "log.csv"
    f.write_text("\n".join([header, *rows]) + "\n")
    s = import_interactions(str(f), str(tmp_path / "src"))
    assert json.loads((tmp_path / "src" / "source.json").read_text()) == {"feedback": feedback, "empty_days": []}
    assert ParquetSource(str(tmp_path / "src")).feedback() == feedback
    assert s.feedback == feedback and f"feedback {feedback}" in str(s)


def test_days_without_events_inside_the_data_are_recorded_as_empty(tmp_path):
    f = tmp_path / "log.csv"  # Jan 1, Jan 2 and Jan 5 2024: Jan 3 and 4 have no events
    f.write_text("user,item,timestamp\n1,2,2024-01-01T10:00:00Z\n1,3,2024-01-02T10:00:00Z\n2,2,2024-01-05T10:00:00Z\n")
    import_interactions(str(f), str(tmp_path / "src"))
    assert json.loads((tmp_path / "src" / "source.json").read_text())["empty_days"] == ["2024-01-03", "2024-01-04"]
    assert ParquetSource(str(tmp_path / "src")).empty_days() == [date(2024, 1, 3), date(2024, 1, 4)]


def test_movielens_records_ratings_and_a_source_without_record_is_explicit(tmp_path):
    import_movielens(str(write_ml100k(tmp_path / "ml")), str(tmp_path / "src"))
    assert ParquetSource(str(tmp_path / "src")).feedback() == "ratings"
    (tmp_path / "src" / "source.json").unlink()
    assert ParquetSource(str(tmp_path / "src")).feedback() == "explicit"
    (tmp_path / "src" / "source.json").write_text('{"feedback": "likes"}')
    with pytest.raises(ContractError, match=r"source\.json: unknown feedback kind 'likes'"):
        ParquetSource(str(tmp_path / "src")).feedback()


# ------------------------------------------------------------------------------------------------ bad input


def _bad_ml(tmp_path: Path, name: str, content: str) -> Path:
    d = write_ml100k(tmp_path / "ml")
    (d / name).write_text(content)
    return d


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("u.data", "", r"u\.data: empty file"),
        ("u.data", "1\t10\t5\n", r"u\.data: line 1 has 3 fields, expected 4"),
        ("u.data", f"1\t10\t5\t{T0}\n1\t20\t4\tyesterday\n", r"u\.data: unparseable timestamps in timestamp; line 2: 'yesterday'"),
        ("u.data", f"1\t10\t6\t{T0}\n", r"u\.data: ratings must be numbers in \[0\.5, 5\]; line 1: '6'"),
        ("u.data", f"1\t99\t5\t{T0}\n", r"u\.data: 1 item_id\(s\) in the events are not in the items file, e\.g\. \[99\]"),
        ("u.user", "1|24|M\n", r"u\.user: line 1 has 3 fields, expected 5"),
    ],
)
def test_bad_ml100k_files_are_named_and_leave_nothing(tmp_path, name, content, message):
    d, out = _bad_ml(tmp_path, name, content), tmp_path / "src"
    with pytest.raises(ContractError, match=message):
        import_movielens(str(d), str(out))
    assert _leftovers(out) == []


def test_missing_path_and_missing_companion_file(tmp_path):
    with pytest.raises(ContractError, match=r"nope: no such file or directory"):
        import_movielens(str(tmp_path / "nope"), str(tmp_path / "src"))
    d = write_ml100k(tmp_path / "ml")
    os.remove(d / "u.user")
    with pytest.raises(ContractError, match=r"u\.user: no such file or directory"):
        import_movielens(str(d), str(tmp_path / "src"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ContractError, match="no MovieLens files found"):
        import_movielens(str(tmp_path / "empty"), str(tmp_path / "src"))
    assert _leftovers(tmp_path / "src") == []


def test_recbole_file_without_required_columns_or_rows(tmp_path):
    d = write_recbole(tmp_path / "ml")
    (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t10\t5\n")
    with pytest.raises(ContractError, match=r"ml-100k\.inter: missing required column\(s\) \['timestamp'\]"):
        import_movielens(str(d), str(tmp_path / "src"))
    (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    with pytest.raises(ContractError, match=r"ml-100k\.inter: empty file \(no rows\)"):
        import_movielens(str(d), str(tmp_path / "src"))
    assert _leftovers(tmp_path / "src") == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"log\.csv: empty file"),
        ("user,item,timestamp\n", r"log\.csv: empty file \(no rows\)"),
        ("user,timestamp\n1,100\n", r"log\.csv: missing required column\(s\) \['item'\]"),
        ("user,item,timestamp\n1,2,2024-01-01\n1,3,not-a-date\n", r"log\.csv: unparseable timestamps in timestamp.*line 3: 'not-a-date'"),
        ("user,item,timestamp\n1,2,100\n1,3,soon\n", r"log\.csv: unparseable timestamps in timestamp; line 3: 'soon'"),
        ("user,item,action\n1,2,click\n1,3,like\n", r"log\.csv: unknown action\(s\) \['like'\].*line 3"),
        ("user,item,rating,action\n1,2,5,click\n", r"log\.csv: has both 'rating' and 'action'"),
        # ids: negative (FAISS's "no result" is -1), beyond int64, empty, missing-value markers
        ("user,item\n1,2\n-5,3\n", r"log\.csv: user ids must be >= 0 \(FAISS answers -1 for 'no result'\); line 3: '-5'"),
        ("user_id,item_id\n1,9223372036854775807\n1,9223372036854775808\n",
         r"log\.csv: item_id ids must fit int64 \(at most 9223372036854775807\); line 3: '9223372036854775808'"),
        ("user,item\n1,2\n,3\n", r"log\.csv: user is empty or a missing-value marker; line 3: ''"),
        ("user,item\n1,2\nnan,3\n", r"log\.csv: user is empty or a missing-value marker; line 3: 'nan'"),
        ("user,item\nu1,NaN\n", r"log\.csv: item is empty or a missing-value marker; line 2: 'NaN'"),
        ("user,item\nalice,x\nbob,NULL\n", r"log\.csv: item is empty or a missing-value marker; line 3: 'NULL'"),
        # epoch units: told by magnitude, never mixed; times before 1970 are not interaction times
        ("user,item,timestamp\n1,2,1700000000000\n1,3,1700000000\n",
         r"log\.csv: timestamp mixes epoch units: line 2 looks like milliseconds \('1700000000000'\), "
         r"line 3 like seconds \('1700000000'\)"),
        ("user,item,timestamp\n1,2,100\n1,3,-100\n",
         r"log\.csv: timestamps in timestamp must be in \[1970-01-01, 2262-04-11\) \(read as seconds since "
         r"1970-01-01 UTC\); line 3: '-100'"),
        # past int64 nanoseconds (year 2262): refused, not read as NaT and dropped; infinities are no time at all
        ("user,item,timestamp\n1,2,1700000000000000000\n1,3,1700000060000000000\n2,3,10000000000000000000\n",
         r"log\.csv: timestamps in timestamp must be in \[1970-01-01, 2262-04-11\) \(read as nanoseconds since "
         r"1970-01-01 UTC\); line 4: '10000000000000000000'"),
        ("user,item,timestamp\n1,2,1700000000\n1,3,inf\n", r"log\.csv: unparseable timestamps in timestamp; line 3: 'inf'"),
        ("user,item,timestamp\n1,2,-inf\n", r"log\.csv: unparseable timestamps in timestamp; line 2: '-inf'"),
    ],
)
def test_bad_interaction_files_are_named_and_leave_nothing(tmp_path, content, message):
    f, out = tmp_path / "log.csv", tmp_path / "src"
    f.write_text(content)
    with pytest.raises(ContractError, match=message):
        import_interactions(str(f), str(out))
    assert _leftovers(out) == []


def _parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"user": [1, 2], "item": [3, 4], "timestamp": [True, False]},
         r"log\.parquet: timestamp holds booleans, not times; line 1: (np\.)?True"),
        ({"user": pa.array([[1, 2], [3]], pa.list_(pa.int64())), "item": [3, 4], "timestamp": [1, 2]},
         r"log\.parquet: user must hold one value per row, not lists; line 1: array\(\[1, 2\]\)"),
        ({"user": [1, 2], "item": pa.array([3, -1], pa.int64())},
         r"log\.parquet: item ids must be >= 0 \(FAISS answers -1 for 'no result'\); line 2: (np\.int64\()?-1"),
        ({"user": pa.array([1, 2**63], pa.uint64()), "item": [3, 4]},
         r"log\.parquet: user ids must fit int64 \(at most 9223372036854775807\); line 2: (np\.uint64\()?9223372036854775808"),
        ({"user": [True, False], "item": [3, 4]}, r"log\.parquet: user holds booleans, not ids; line 1"),
        ({"user": ["a", None], "item": [3, 4]}, r"log\.parquet: user is empty or a missing-value marker; line 2: (None|nan)"),
    ],
)
def test_bad_parquet_columns_are_named_and_leave_nothing(tmp_path, columns, message):
    f, out = _parquet(tmp_path / "log.parquet", **columns), tmp_path / "src"
    with pytest.raises(ContractError, match=message):
        import_interactions(str(f), str(out))
    assert _leftovers(out) == []


@pytest.mark.parametrize(("scale", "unit"), [(1_000, "milliseconds"), (1_000_000, "microseconds"),
                                             (1_000_000_000, "nanoseconds")])
def test_epoch_units_are_told_by_magnitude_and_converted(tmp_path, scale, unit):
    f = _parquet(tmp_path / "log.parquet", user=[1, 1], item=[2, 3],
                 timestamp=pa.array([1_700_000_000 * scale, 1_700_000_060 * scale + scale // 2], pa.int64()))
    s = import_interactions(str(f), str(tmp_path / "src"))
    ts = [e[4] for e in _events(ParquetSource(str(tmp_path / "src")))]
    assert ts == ["2023-11-14 22:13", "2023-11-14 22:14"]  # 1_700_000_000 s = 2023-11-14 22:13:20 UTC
    assert f"timestamp: epoch {unit} (told by magnitude), converted" in s.notes
    start = pd.Timestamp("2023-11-14", tz="UTC").to_pydatetime()
    got = ParquetSource(str(tmp_path / "src")).read_events(start, start + timedelta(days=1)).ts.tolist()
    assert got == [pd.Timestamp("2023-11-14 22:13:20", tz="UTC"), pd.Timestamp("2023-11-14 22:14:20.5", tz="UTC")]


def test_exact_duplicate_rows_are_collapsed_and_counted(tmp_path):
    f = tmp_path / "log.csv"
    # lines 3 and 5 repeat line 2 exactly; line 4 differs in its item, line 6 in its action
    f.write_text("user,item,timestamp,action\n1,2,1000000000,click\n1,2,1000000000,click\n1,3,1000000000,click\n"
                 "1,2,1000000000,click\n1,2,1000000000,save\n")
    s = import_interactions(str(f), str(tmp_path / "src"))
    assert [e[:4] for e in _events(ParquetSource(str(tmp_path / "src")))] == [
        ("1-2-1000000000", 1, 2, "click"), ("1-2-1000000000-1", 1, 2, "save"), ("1-3-1000000000", 1, 3, "click")]
    assert s.n_events == 3
    assert f"2 exact duplicate row(s) in {f} collapsed (first: line 3 repeats line 2)" in str(s)


def test_movielens_negative_or_huge_ids_are_refused_and_duplicates_collapsed(tmp_path):
    d = write_ml100k(tmp_path / "ml")
    good = (d / "u.data").read_text()
    (d / "u.data").write_text(good + "-3\t10\t4\t883612800\n")
    with pytest.raises(ContractError, match=r"u\.data: user_id ids must be >= 0 .*; line 6: '-3'"):
        import_movielens(str(d), str(tmp_path / "src"))
    (d / "u.data").write_text(good + "1\t99999999999999999999\t4\t883612800\n")
    with pytest.raises(ContractError, match=r"u\.data: item_id ids must fit int64 .*; line 6: '99999999999999999999'"):
        import_movielens(str(d), str(tmp_path / "src"))
    assert _leftovers(tmp_path / "src") == []
    (d / "u.data").write_text(good + good.splitlines(keepends=True)[0])  # the first rating twice
    s = import_movielens(str(d), str(tmp_path / "src"))
    assert s.n_events == len(RATINGS) and _events(ParquetSource(str(tmp_path / "src"))) == EXPECTED_EVENTS
    assert f"1 exact duplicate row(s) in {d / 'u.data'} collapsed (first: line 6 repeats line 1)" in str(s)


def test_interactions_missing_file(tmp_path):
    with pytest.raises(ContractError, match=r"absent\.csv: no such file or directory"):
        import_interactions(str(tmp_path / "absent.csv"), str(tmp_path / "src"))


def test_failure_while_writing_removes_the_partial_source(tmp_path):
    # Day 1 is valid and gets written; day 2 has an id that is not an integer, so the sink fails mid-way.
    events = pd.DataFrame({
        "event_id": ["a", "b"], "user_id": pd.Series([1, "x"], dtype=object), "item_id": [1, 1],
        "action": ["click", "click"], "ts": pd.to_datetime(["2024-01-01", "2024-01-02"], utc=True),
        "surface": ["homefeed"] * 2, "context_item_id": pd.array([pd.NA, pd.NA], dtype="Int64"), "query": [None] * 2,
    })
    users = pd.DataFrame({"user_id": [1], "signup_ts": [None]})
    items = pd.DataFrame({"item_id": [1], "category": ["c"], "genres": [None], "title": [None], "created_ts": [None]})
    with pytest.raises(ContractError, match="ids must be integers"):
        write_source(str(tmp_path / "src"), events, users, items, "explicit")
    assert _leftovers(tmp_path / "src") == []


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_import_prints_summary_and_fails_cleanly(tmp_path, data_root, capsys):
    ml = write_ml100k(tmp_path / "ml")
    assert main(["data", "import", "movielens", str(ml), "--out", str(tmp_path / "src")]) == 0
    assert "imported MovieLens (ml-100k)" in capsys.readouterr().out
    assert main(["data", "import", "movielens", str(ml), "--out", str(tmp_path / "src")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "import", "movielens", str(ml), "--out", str(tmp_path / "src"), "--force"]) == 0
    assert main(["data", "import", "interactions", str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv: no such file or directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ fetch script


def _fetch_script():
    return load_script("scripts/fetch_ml100k.py")


def test_fetch_script_refuses_files_whose_checksum_differs(tmp_path):
    fetch = _fetch_script()
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in fetch.FILE_SHA256:
            z.writestr(fetch.MEMBER_DIR + name, "user_id:token\n1\n")  # right names, wrong bytes
    with pytest.raises(fetch.ChecksumError, match=r"ml-100k\.inter: sha256 [0-9a-f]{64} does not match"):
        fetch.extract(wheel, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recbole/__init__.py", "")
    with pytest.raises(fetch.ChecksumError, match=r"has no recbole/dataset_example/ml-100k/ml-100k\.inter"):
        fetch.extract(wheel, tmp_path / "out")


def test_recbole_file_can_be_named_when_a_directory_holds_several(tmp_path):
    d = write_recbole(tmp_path / "ml")
    for ext in ("inter", "user", "item"):
        (d / f"other.{ext}").write_text((d / f"ml-100k.{ext}").read_text())
    with pytest.raises(ContractError, match="several RecBole .inter files"):
        import_movielens(str(d), str(tmp_path / "src"))
    assert import_movielens(str(d / "other.inter"), str(tmp_path / "src")).n_events == 5


def test_interactions_query_column_puts_rows_on_search(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("user,item,timestamp,query\n"
                 "1,5,2024-03-01T10:00:00Z, red shoes \n"
                 "2,6,2024-03-01T09:00:00Z,\n"
                 "1,5,2024-03-01T10:00:00Z, red shoes \n")  # an exact repeat: collapsed with its query
    s = import_interactions(str(f), str(tmp_path / "src"))
    ev = ParquetSource(str(tmp_path / "src")).read_events(datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 2, tzinfo=UTC))
    assert ev[["user_id", "surface", "query"]].values.tolist() == [[2, "homefeed", None], [1, "search", "red shoes"]]
    assert "query column: 1 rows on the search surface" in str(s)
    f.write_text("user,item,query\n1,5,ok\n2,6," + "q" * 257 + "\n")
    with pytest.raises(ContractError, match=r"log.csv: line 3: query of 257 characters; at most 256"):
        import_interactions(str(f), str(tmp_path / "src2"))
