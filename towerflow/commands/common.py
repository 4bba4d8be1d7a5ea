"""Helpers more than one command uses. Like the commands, they import Prefect only when they run."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from towerflow.config import Settings


def add_source_option(p: argparse.ArgumentParser) -> None:
    """``--source``: the event source a command reads; unset means ``Settings().source``."""
    p.add_argument("--source", help="source URI (default: <data_root>/source)")


def prefect_api(settings: Settings) -> AbstractContextManager:
    """Point Prefect at TOWERFLOW_PREFECT_API_URL when it is set and PREFECT_API_URL is not.

    PREFECT_API_URL wins so that a shell exported for one server is not redirected; with neither set, flows run
    on Prefect's ephemeral API.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if settings.prefect_api_url and not PREFECT_API_URL.value():
        return temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url})
    return nullcontext()
