"""Helpers more than one command uses. Like the commands, they import Prefect only when they run."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from towerflow.config import Settings


def add_source_option(p: argparse.ArgumentParser) -> None:
    """``--source``: the event source a command reads; unset means ``Settings().source``."""
    p.add_argument("--source", help="source URI (default: <data_root>/source)")


def seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def add_post_options(p: argparse.ArgumentParser, what: str, endpoint: str, batch_size: int) -> None:
    """``--url``, ``--batch-size`` and ``--max-body-bytes``: sending ``what`` (e.g. "events") to a running service's
    ``endpoint`` in POSTs cut by count and by the service's body limit, instead of writing locally."""
    p.add_argument("--url", help=f"a running service (http://HOST:PORT): POST the {what} to its {endpoint} instead "
                                 "of writing here")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"at most this many {what} per POST with --url (default {batch_size})")
    p.add_argument("--max-body-bytes", type=positive_int, default=64 * 1024,
                   help="and at most this many bytes per POST body: the service's limit (default 65536, as "
                        "towerflow serve's)")


def positive_int(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def prefect_api(settings: Settings) -> AbstractContextManager:
    """Point Prefect at PREFECT_API_URL, else TOWERFLOW_PREFECT_API_URL, else a temporary server for this run.

    PREFECT_API_URL wins so that a shell exported for one server is not redirected. With neither set, flows run on
    a temporary local API like Prefect's ephemeral one, but started so that it dies with this process even when
    the process is killed (``infra.stack.temporary_prefect_server``); Prefect's own would outlive a ``kill -9``.
    """
    import os

    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return nullcontext()
    if settings.prefect_api_url:
        return temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url})
    return _temporary_api(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180))


@contextmanager
def _temporary_api(timeout: float) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from towerflow.infra.stack import temporary_prefect_server

    with temporary_prefect_server(timeout) as server, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            yield
        finally:  # send queued run logs and events while the server is up: at exit it is gone ("Error logging to API")
            _drain_prefect_workers()


def _drain_prefect_workers(timeout: float = 10) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout, at_exit=False)
