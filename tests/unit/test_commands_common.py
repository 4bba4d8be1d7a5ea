"""The helpers the CLI commands share (towerflow/commands/common.py)."""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from towerflow.commands.common import prefect_api
from towerflow.config import Settings


def test_prefect_api_uses_the_towerflow_url_only_when_prefect_has_none(data_root, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOWERFLOW_PREFECT_API_URL", "http://127.0.0.1:4321/api")
    settings = Settings()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # whatever a session harness set
        with prefect_api(settings):
            assert PREFECT_API_URL.value() == "http://127.0.0.1:4321/api"
        assert PREFECT_API_URL.value() is None  # restored on exit
        with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9999/api"}), prefect_api(settings):
            assert PREFECT_API_URL.value() == "http://127.0.0.1:9999/api"  # an exported PREFECT_API_URL wins
    # neither set: a temporary server tied to this process (tests/reliability/test_leftovers.py)

