"""Dynamic micro-batching: concurrent ``/retrieve`` requests answered together, off the event loop.

The event loop parses requests and hands each to ``MicroBatcher.submit``; whenever one of ``threads`` workers is
free, the requests waiting (at most ``max_batch``) go to it as ONE batch (``RetrievalService.retrieve_batch``: one
release, one state read, one ``combine``, one FAISS search). While the workers are busy, requests gather, so the
batch size follows the load: a lone request is answered at once, and at 32 concurrent clients a few batches answer
them all. ``max_wait_s`` > 0 also holds a batch smaller than ``max_batch`` back for at most that long, even with a
worker free (fewer, larger batches at the price of that much latency when the service is quiet).

Why threads: torch and FAISS release the GIL while they compute, so a worker's model work runs on another core
beside the event loop's HTTP parsing, and the event loop never stalls behind a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

Q = TypeVar("Q")

# A batch's answers: one per query, each a result or the exception that query alone raised
Answer = Callable[[list[Q]], Sequence[Any]]


class MicroBatcher(Generic[Q]):
    """Gathers queries submitted on one event loop into batches answered by ``answer`` on worker threads."""

    def __init__(self, answer: Answer, *, max_batch: int = 32, max_wait_s: float = 0.0, threads: int = 1,
                 initializer: Callable[[], None] | None = None):
        """``initializer``: run once in each worker thread before its first batch (per-thread settings)."""
        if max_batch < 1 or threads < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch and threads must be >= 1 and max_wait_s >= 0, got {max_batch}, {threads}, "
                             f"{max_wait_s}")
        self.answer, self.max_batch, self.max_wait_s, self.threads = answer, max_batch, max_wait_s, threads
        self.initializer = initializer
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Q, asyncio.Future, float]] = []
        self._busy = 0
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0  # answered so far, with ...
        self.queries = 0  # ... this many queries in all

    async def submit(self, query: Q) -> Any:
        """The query's answer (or its exception raised), once the batch it joined is answered."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((query, fut, time.monotonic()))
        self._dispatch(loop)
        return await fut

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._pending and self._busy < self.threads:
            if len(self._pending) < self.max_batch and self.max_wait_s > 0:
                wait = self._pending[0][2] + self.max_wait_s - time.monotonic()
                if wait > 0:  # still gathering: come back when the oldest has waited max_wait_s
                    if self._timer is None:
                        self._timer = loop.call_later(wait, self._on_timer, loop)
                    return
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            batch = [entry for entry in batch if not entry[1].done()]  # a client that went away is not answered
            if not batch:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="retrieve-batch",
                                                initializer=self.initializer)
            self._busy += 1
            work = loop.run_in_executor(self._pool, self.answer, [q for q, _, _ in batch])
            work.add_done_callback(lambda w, batch=batch: self._done(loop, batch, w))

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._dispatch(loop)

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list, work: asyncio.Future) -> None:
        self._busy -= 1
        self.batches, self.queries = self.batches + 1, self.queries + len(batch)
        error = work.exception()
        answers = [error] * len(batch) if error is not None else work.result()
        for (_, fut, _), out in zip(batch, answers, strict=True):
            if fut.done():
                continue
            if isinstance(out, BaseException):
                fut.set_exception(out)
            else:
                fut.set_result(out)
        self._dispatch(loop)

    def close(self) -> None:
        """Stop the workers once the batches in flight are answered."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
