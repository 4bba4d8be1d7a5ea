"""The action store's contract, on the embedded SQLite store and on Redis (a real redis-server): whole batches,
idempotent by event_id, a conflict stores nothing, per-user reads in time order, the log read by sequence."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from towerflow.serving.realtime.events import check_events
from towerflow.serving.realtime.store import CompactionMark, ConflictError, to_frame

NOW = datetime(2026, 1, 6, tzinfo=UTC)


def batch(*specs):
    """(event_id, user_id, item_id, second) -> a checked batch at 2026-01-05T10:00:<second>."""
    return check_events([{"event_id": e, "user_id": u, "item_id": i, "action": "click",
                          "ts": f"2026-01-05T10:00:{s:02d}Z", "surface": "homefeed"} for e, u, i, s in specs], now=NOW)


def test_append_is_idempotent_by_event_id(store):
    first = store.append(batch(("a", 1, 10, 0), ("b", 1, 11, 1), ("c", 2, 12, 2)))
    assert (first.accepted, first.duplicates, first.last_seq) == (3, 0, 3)
    again = store.append(batch(("b", 1, 11, 1), ("d", 2, 13, 3)))
    assert (again.accepted, again.duplicates, again.last_seq) == (1, 1, 4)
    assert [r[0] for r in store.read(1, 4)] == ["a", "b", "c", "d"]
    assert store.last_seq() == 4


def test_a_conflicting_event_id_refuses_the_whole_batch(store):
    store.append(batch(("a", 1, 10, 0)))
    with pytest.raises(ConflictError) as err:
        store.append(batch(("x", 1, 20, 5), ("a", 1, 99, 0)))
    assert err.value.row == 1
    assert "events[1].event_id: 'a' is already stored as a different event (item_id: stored 10, now 99)" \
        in str(err.value)
    assert store.last_seq() == 1 and [r[0] for r in store.recent(1)] == ["a"]  # "x" was not stored either


def test_recent_is_the_users_last_actions_oldest_first(store):
    store.append(batch(("c", 1, 12, 2), ("a", 1, 10, 0), ("o", 2, 50, 1), ("b", 1, 11, 1), ("d", 1, 13, 3)))
    assert [r[0] for r in store.recent(1)] == ["a", "b", "c", "d"]
    assert [r[0] for r in store.recent(1, limit=2)] == ["c", "d"]
    since = int(datetime(2026, 1, 5, 10, 0, 1, tzinfo=UTC).timestamp() * 1e6)
    assert [r[0] for r in store.recent(1, since_us=since)] == ["b", "c", "d"]
    assert store.recent(3) == []
    rec = store.recent(2)[0]
    assert rec == ("o", 2, 50, "click", since, "homefeed", None, None, None)
    frame = to_frame(store.recent(1))
    assert frame.event_id.tolist() == ["a", "b", "c", "d"] and str(frame.ts.dtype) == "datetime64[us, UTC]"
    # several users at once (a batch of requests): each user's recent(), users without events empty
    assert store.recent_many([2, 1, 3, 1]) == {1: store.recent(1), 2: [rec], 3: []}
    many = store.recent_many([1, 2], since_us=since, limit=2)
    assert [[r[0] for r in many[u]] for u in (1, 2)] == [["c", "d"], ["o"]]
    assert store.recent_many([]) == {}


def test_recent_many_reads_more_users_than_one_statement_joins(store):
    store.append(batch(*[(f"e{u}", u, 1000 + u, u % 60) for u in range(1, 201)]))  # 200 users > 150 a statement
    many = store.recent_many(range(201))
    assert len(many) == 201 and many[0] == [] and all([r[0] for r in many[u]] == [f"e{u}"] for u in range(1, 201))


def test_all_fields_round_trip(store):
    df = check_events([{"event_id": "q", "user_id": 2**62, "item_id": 9007199254740993, "action": "skip",
                        "ts": "2026-01-05T10:00:00.123456Z", "surface": "search", "context_item_id": 7,
                        "query": "naïve café"}], now=NOW)
    store.append(df)
    back = to_frame(store.read(1, 1))
    assert back.to_dict("records") == df.to_dict("records")


def test_the_compaction_mark_and_lease(store):
    assert store.compaction_mark() == CompactionMark(0, None)
    store.set_compaction_mark(CompactionMark(3, (4, 9)))
    assert store.compaction_mark() == CompactionMark(3, (4, 9))
    token = store.lock("compaction", 60)
    assert token is not None and store.lock("compaction", 60) is None
    store.unlock("compaction", "not-the-token")
    assert store.lock("compaction", 60) is None
    store.unlock("compaction", token)
    assert store.lock("compaction", 60) is not None


def test_prune_keeps_each_users_last_n_and_never_an_event_not_yet_compacted(store):
    def at(second: int) -> int:
        return int(datetime(2026, 1, 5, 10, 0, second, tzinfo=UTC).timestamp() * 1e6)

    def users_events(user: int) -> list[str]:
        return [r[0] for r in store.recent(user)]

    store.append(batch(("a", 1, 10, 0), ("b", 1, 11, 1), ("c", 1, 12, 2), ("d", 1, 13, 3), ("o", 2, 50, 1)))
    assert store.prune(keep_per_user=1, before_us=at(59)) == 0  # nothing compacted yet: nothing may go
    assert users_events(1) == ["a", "b", "c", "d"]
    store.set_compaction_mark(CompactionMark(3, None))  # a, b, c are in the source
    assert store.prune(keep_per_user=2) == 2  # a, b: beyond user 1's newest two
    assert users_events(1) == ["c", "d"] and users_events(2) == ["o"]
    store.append(batch(("e", 1, 14, 4)))  # seq 6
    assert store.prune(keep_per_user=1, before_us=at(59)) == 1  # c (compacted, old); d, o, e are not compacted
    assert users_events(1) == ["d", "e"] and users_events(2) == ["o"]
    assert (store.append(batch(("a", 1, 10, 0))).accepted, store.append(batch(("d", 1, 13, 3))).duplicates) == (1, 1)
    assert users_events(1) == ["a", "d", "e"]  # a pruned id is forgotten: stored again (seq 7); d still known
    store.set_compaction_mark(CompactionMark(7, None))
    assert store.prune(keep_per_user=1) == 2  # user 1 keeps e (newest), d and a go; user 2 keeps o
    assert users_events(1) == ["e"] and users_events(2) == ["o"] and store.count() == 2
    assert store.last_seq() == 7  # the newest seq was pruned: the counter does not go back
    assert store.append(batch(("f", 3, 15, 5))).last_seq == 8
