"""The Redis action store (``TOWERFLOW_REALTIME_URI=redis://host:port/db``): one store for several service replicas.

Keys under ``prefix`` (default ``towerflow:rt:``): ``seq`` (the counter), ``ids`` (hash event_id -> the event's
canonical JSON: idempotency and conflicts), ``log`` (sorted set, score seq: what compaction reads), ``u:<user_id>``
(sorted set, score ts in microseconds: the user's last ``keep_per_user`` actions), ``mark`` (the compaction mark)
and ``lock:<name>`` (leases). A batch is appended by one Lua script, which Redis runs alone: the duplicate check,
the sequence numbers and the writes of a batch are one step, so replicas appending at once never interleave inside a
batch and ``seq`` order is commit order. Durability is the server's: run it with ``appendonly yes`` and
``appendfsync always`` for an acknowledged event to survive a crash of the server.
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

    def read(self, first: int, last: int) -> list[Record]:
        return [decode(r) for r in self._r.zrangebyscore(self._k["log"], int(first), int(last))]

    def last_seq(self) -> int:
        return int(self._r.get(self._k["seq"]) or 0)

    def count(self) -> int:
        return int(self._r.zcard(self._k["log"]))

    def compaction_mark(self) -> CompactionMark:
        return mark_from_json(self._r.get(self._k["mark"]))

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
