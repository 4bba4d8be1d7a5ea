"""Progress output for long steps: a timed step line and a progress bar that degrades to log lines off a TTY."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def step(name: str) -> Iterator[dict]:
    """Print ``name ...`` then ``name done in 1.2s``; the yielded dict's ``note`` is appended to the last line."""
    info: dict = {}
    say(f"{name} ...")
    t0 = time.perf_counter()
    yield info
    note = f" ({info['note']})" if info.get("note") else ""
    say(f"{name} done in {time.perf_counter() - t0:.1f}s{note}")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every: float = 2.0) -> Iterator[T]:
    """Yield from ``items``, reporting ``desc i/total`` at most every ``every`` seconds (and at the end)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    t0 = last = time.perf_counter()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every:
            last = now
            of = f"/{total}" if total else ""
            say(f"  {desc} {i}{of} ({now - t0:.1f}s)")
    if i and time.perf_counter() - t0 >= every:
        say(f"  {desc} {i}/{total or i} done ({time.perf_counter() - t0:.1f}s)")
