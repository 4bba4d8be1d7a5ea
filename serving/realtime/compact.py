"""The hand-off to training: acknowledged events move from the action store into the event source, exactly once.

One compaction step takes the next range of sequence numbers after the store's high-water mark (at most
``max_rows``), records it as pending in the store, writes its events into the source's day partitions as
``events/dt=<day>/rt-<first>-<last>.parquet`` (one file per day the range touches, each published atomically by
``ParquetSink``: written under a temporary name, then renamed), and only then moves the mark to ``last``. A step
killed anywhere leaves the range pending; the next step writes exactly that range again, under the same file names
(same events, same content), so a file is replaced, never doubled, and nothing is skipped. A lease in the store
(``lock``) keeps two compactors (the service's background task, ``towerflow events compact``) from interleaving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from towerflow.data.source import ParquetSink
from towerflow.errors import TowerflowError
from towerflow.serving.realtime.store import ActionStore, CompactionMark, to_frame

log = logging.getLogger("towerflow.serving.realtime")
LOCK = "compaction"


class CompactionBusy(TowerflowError):
    """Another compactor holds the lease."""


@dataclass(frozen=True)
class CompactResult:
    events: int  # events written to the source by this call
    files: list[str]  # files written (relative to the source root)
    high_water: int  # the mark after this call


def file_name(first: int, last: int) -> str:
    return f"rt-{first:012d}-{last:012d}.parquet"


def compact_step(store: ActionStore, sink: ParquetSink, max_rows: int = 100_000) -> CompactResult:
    """Hand one range (the pending one, else the next ``max_rows`` events after the mark) to the source."""
    mark = store.compaction_mark()
    if mark.pending is None:
        last_seq = store.last_seq()
        if last_seq <= mark.high_water:
            return CompactResult(0, [], mark.high_water)
        mark = CompactionMark(mark.high_water, (mark.high_water + 1, min(last_seq, mark.high_water + max_rows)))
        store.set_compaction_mark(mark)
    first, last = mark.pending
    events = to_frame(store.read(first, last))
    files = []
    for day, part in events.groupby(events["ts"].dt.date, sort=True):
        name = file_name(first, last)
        sink.write_events_day(day, part.sort_values(["ts", "event_id"]).reset_index(drop=True), name=name)
        files.append(f"events/dt={day.isoformat()}/{name}")
    store.set_compaction_mark(CompactionMark(last, None))
    return CompactResult(len(events), files, last)


def compact(store: ActionStore, source_uri: str, max_rows: int = 100_000, lease_s: float = 300.0) -> CompactResult:
    """Hand every acknowledged event not yet in the source over to it (steps of ``max_rows``).

    Raises CompactionBusy while another compactor holds the lease (it expires ``lease_s`` after a holder died).
    """
    token = store.lock(LOCK, lease_s)
    if token is None:
        raise CompactionBusy(f"another compaction of {store.uri} is running (its lease lasts {lease_s:g}s)")
    sink, total, files = ParquetSink(source_uri), 0, []
    try:
        while True:
            step = compact_step(store, sink, max_rows)
            total, files = total + step.events, files + step.files
            if step.high_water >= store.last_seq():
                break
    finally:
        store.unlock(LOCK, token)
    if total:
        log.info("compacted %d realtime events into %s (%d files), high water %d", total, source_uri, len(files),
                 step.high_water)
    return CompactResult(total, files, store.compaction_mark().high_water)

