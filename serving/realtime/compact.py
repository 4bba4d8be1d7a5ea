"""The hand-off to training: acknowledged events move from the action store into the event source, exactly once.

One compaction step takes the next range of sequence numbers after the store's high-water mark (at most
``max_rows``), records it as pending in the store, writes its events into the source's day partitions as
``events/dt=<day>/rt-<first>-<last>.parquet`` (one file per day the range touches, each published atomically by
``ParquetSink``: written under a temporary name, then renamed), and only then moves the mark to ``last``. A step
killed anywhere leaves the range pending; the next step writes exactly that range again, under the same file names
(same events, same content), so a file is replaced, never doubled, and nothing is skipped. An event whose id is
already in its day's partition in another file (the day was replayed into a service that compacts into the source
it came from) is left out, so the data gate's ``events.event_id unique`` holds. A lease in the store
(``lock``) keeps two compactors (the service's background task, ``towerflow events compact``) from interleaving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow.parquet as pq

from towerflow.data.source import ParquetSink
from towerflow.errors import TowerflowError
from towerflow.serving.realtime.store import ActionStore, CompactionMark, to_frame, without_empty_optional

log = logging.getLogger("towerflow.serving.realtime")
LOCK = "compaction"


class CompactionBusy(TowerflowError):
    """Another compactor holds the lease."""


@dataclass(frozen=True)
class CompactResult:
    events: int  # events written to the source by this call (not counting those already there)
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
    events, name = to_frame(store.read(first, last)), file_name(first, last)
    files, written = [], 0
    for day, part in events.groupby(events["ts"].dt.date, sort=True):
        part = part[~part["event_id"].isin(ids_in_day(sink, day, besides=name))]
        if len(part) == 0:
            continue
        part = without_empty_optional(part)  # (a day's part may lack what another day's has)
        written += sink.write_events_day(day, part.sort_values(["ts", "event_id"]).reset_index(drop=True), name=name)
        files.append(f"events/dt={day.isoformat()}/{name}")
    store.set_compaction_mark(CompactionMark(last, None))
    return CompactResult(written, files, last)


def ids_in_day(sink: ParquetSink, day, besides: str) -> set[str]:
    """The event ids in day ``day``'s partition files other than ``besides`` (this range's own file)."""
    paths = [p for p in sink.fs.glob(f"{sink.root}/events/dt={day.isoformat()}/*.parquet")
             if p.rsplit("/", 1)[-1] != besides]
    ids: set[str] = set()
    for p in paths:
        with sink.fs.open(p, "rb") as f:
            ids.update(pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist())
    return ids


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

