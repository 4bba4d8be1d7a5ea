"""The Redis action store (``TOWERFLOW_REALTIME_URI=redis://host:port/db``): one store for several service replicas.

Keys under ``prefix`` (default ``towerflow:rt:``): ``seq`` (the counter), ``ids`` (hash event_id -> the event's
canonical JSON: idempotency and conflicts), ``log`` (sorted set, score seq: what compaction reads), ``u:<user_id>``
(sorted set, score ts in microseconds: the user's last ``keep_per_user`` actions), ``mark`` (the compaction mark)
and ``lock:<name>`` (leases). A batch is appended by one Lua script, which Redis runs alone: the duplicate check,
the sequence numbers and the writes of a batch are one step, so replicas appending at once never interleave inside a
batch and ``seq`` order is commit order. Durability is the server's: run it with ``appendonly yes`` and
``appendfsync always`` for an acknowledged event to survive a crash of the server.

Retention (``prune``, store.py's rules): an event stays in ``log`` (and its id in ``ids``) while it is not yet
compacted or still in its user's set; ``prune`` walks the compacted part of ``log`` (seq <= the high-water mark)
and drops from the user's set, ``log`` and ``ids`` each event older than ``before_us``, beyond its user's newest
``keep_per_user``, or already trimmed from its user's set by an append (which keeps the newest
``keep_per_user`` of the store's own). Its cost is one pass over ``log``, which holds the uncompacted events
plus at most ``keep_per_user`` per user.
"""

from __future__ import annotations

import uuid

import pandas as pd

from towerflow.serving.realtime.store import (
    ActionStoreError,
    AppendResult,
    CompactionMark,
    ConflictError,
    Record,
    conflict_message,
    decode,
    encode,
    mark_from_json,
    mark_to_json,
    to_records,
)

# KEYS: seq, ids, log, user-key prefix. ARGV: keep_per_user, then (event_id, user_id, ts_us, json) per event.
# -> {accepted, duplicates, last_seq} or {-1, row (1-based), stored json} on a conflict (nothing written).
_APPEND = """
local keep = tonumber(ARGV[1])
local n = (#ARGV - 1) / 4
local new = {}
for i = 0, n - 1 do
  local eid, js = ARGV[2 + 4 * i], ARGV[5 + 4 * i]
  local old = redis.call('HGET', KEYS[2], eid)
  if old then
    if old ~= js then return {-1, i + 1, old} end
  else
    new[#new + 1] = i
  end
end
for _, i in ipairs(new) do
  local eid, user, ts, js = ARGV[2 + 4 * i], ARGV[3 + 4 * i], ARGV[4 + 4 * i], ARGV[5 + 4 * i]
  local seq = redis.call('INCR', KEYS[1])
  redis.call('HSET', KEYS[2], eid, js)
  redis.call('ZADD', KEYS[3], seq, js)
  local ukey = KEYS[4] .. user
  redis.call('ZADD', ukey, ts, js)
  redis.call('ZREMRANGEBYRANK', ukey, 0, -(keep + 1))
end
return {#new, n - #new, tonumber(redis.call('GET', KEYS[1]) or '0')}
"""

# KEYS: log, ids. ARGV: before_us, keep_per_user, then (json, event_id, user key, ts_us) per compacted log event.
# An event goes when it is older than before_us, or beyond its user's newest keep_per_user (rank 0: the newest),
# or already trimmed from its user's set by an append. -> how many events left the store (log and ids).
# One script per chunk: an append never sees half of it.
_PRUNE = """
local before, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local dropped = 0
for i = 3, #ARGV, 4 do
  local js, eid, ukey, ts = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local gone = ts < before
  if not gone then
    local rank = redis.call('ZREVRANK', ukey, js)
    gone = (not rank) or rank >= keep
  end
  if gone then
    redis.call('ZREM', ukey, js)
    redis.call('HDEL', KEYS[2], eid)
    redis.call('ZREM', KEYS[1], js)
    dropped = dropped + 1
  end
end
return dropped
"""


class RedisActionStore:
    def __init__(self, uri: str, prefix: str = "towerflow:rt:", keep_per_user: int = 1000):
        try:
            import redis
        except ImportError as exc:
            raise ActionStoreError(f"TOWERFLOW_REALTIME_URI {uri!r} needs redis-py: pip install "
                                   "'towerflow[realtime]'") from exc
        self.uri, self.prefix, self.keep_per_user = uri, prefix, keep_per_user
        self._r = redis.Redis.from_url(uri)
        try:
            self._r.ping()
        except redis.RedisError as exc:
            raise ActionStoreError(f"realtime action store {uri}: cannot reach Redis ({exc})") from exc
        self._append = self._r.register_script(_APPEND)
        self._prune = self._r.register_script(_PRUNE)
        self._k = {name: prefix + name for name in ("seq", "ids", "log", "u:", "mark")}

    def append(self, events: pd.DataFrame) -> AppendResult:
        records = to_records(events)
        argv: list = [self.keep_per_user]
        for rec in records:
            argv += [rec[0], rec[1], rec[4], encode(rec)]
        k = self._k
        out = self._append(keys=[k["seq"], k["ids"], k["log"], k["u:"]], args=argv)
        if int(out[0]) == -1:
            row = int(out[1]) - 1
            raise ConflictError(conflict_message(records[row][0], row, decode(out[2]), records[row]), row)
        return AppendResult(int(out[0]), int(out[1]), int(out[2]))

    def recent(self, user_id: int, since_us: int | None = None, limit: int = 1000) -> list[Record]:
        lo = "-inf" if since_us is None else int(since_us)
        rows = self._r.zrevrangebyscore(self._k["u:"] + str(int(user_id)), "+inf", lo, start=0, num=int(limit))
        return sorted((decode(r) for r in rows), key=lambda r: (r[4], r[0]))

    def recent_many(self, user_ids, since_us: int | None = None, limit: int = 1000) -> dict[int, list[Record]]:
        """``recent`` of each user (absent ones: []) in one round trip: the same reads, pipelined."""
        users = sorted({int(u) for u in user_ids})
        lo = "-inf" if since_us is None else int(since_us)
        pipe = self._r.pipeline(transaction=False)
        for u in users:
            pipe.zrevrangebyscore(self._k["u:"] + str(u), "+inf", lo, start=0, num=int(limit))
        return {u: sorted((decode(r) for r in rows), key=lambda r: (r[4], r[0]))
                for u, rows in zip(users, pipe.execute(), strict=True)}

    def read(self, first: int, last: int) -> list[Record]:
        return [decode(r) for r in self._r.zrangebyscore(self._k["log"], int(first), int(last))]

    def last_seq(self) -> int:
        return int(self._r.get(self._k["seq"]) or 0)

    def count(self) -> int:
        return int(self._r.zcard(self._k["log"]))

    def compaction_mark(self) -> CompactionMark:
        return mark_from_json(self._r.get(self._k["mark"]))

    def prune(self, keep_per_user: int, before_us: int | None = None, chunk: int = 1000) -> int:
        """Retention (module docstring): compacted events beyond a user's last ``keep_per_user`` or older than
        ``before_us`` leave the store -> how many."""
        if keep_per_user < 1:
            raise ValueError(f"keep_per_user must be >= 1, got {keep_per_user}")
        high_water, k = self.compaction_mark().high_water, self._k
        before = -(2**62) if before_us is None else int(before_us)
        dropped, after = 0, 0
        while True:  # chunks of the compacted log by seq, decoded here (Lua's cjson reads ids as doubles)
            rows = self._r.zrangebyscore(k["log"], f"({after}", high_water, start=0, num=chunk, withscores=True)
            argv: list = [before, int(keep_per_user)]
            for js, _ in rows:
                rec = decode(js)
                argv += [js, rec[0], f"{k['u:']}{rec[1]}", rec[4]]
            if rows:
                dropped += int(self._prune(keys=[k["log"], k["ids"]], args=argv))
                after = int(rows[-1][1])
            if len(rows) < chunk:
                return dropped

    def set_compaction_mark(self, mark: CompactionMark) -> None:
        self._r.set(self._k["mark"], mark_to_json(mark))

    def lock(self, name: str, ttl_s: float) -> str | None:
        token = uuid.uuid4().hex
        ok = self._r.set(f"{self.prefix}lock:{name}", token, nx=True, px=max(1, int(ttl_s * 1000)))
        return token if ok else None

    def unlock(self, name: str, token: str) -> None:
        key = f"{self.prefix}lock:{name}"
        self._r.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                     "return 0", 1, key, token)

    def close(self) -> None:
        self._r.close()
