"""Issue #14 item 2 through the real flow: data that extract cannot keep, or that is absent, stops the retrain at
the data gate, by name, before anything is trained (real Prefect test harness, real GX, copies of ``TINY_WORLD``).

- six rows stamped in 2030 (and one in 2025) filed under ``dt=2026-01-03``: extract used to drop them silently;
- an empty partition in the middle of the window: used to pass with ``missing_days: []``;
- zero rows on the last day: used to fail late, in build_examples ("holdout split is empty").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from tests.worlds import AS_OF, LOOKBACK, tiny_retrain_config, tiny_world
from towerflow.config import Settings

pytestmark = pytest.mark.usefixtures("prefect_harness")
JAN3, JAN4 = pd.Timestamp("2026-01-03").date(), pd.Timestamp("2026-01-04").date()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    with tiny_world(tmp_path_factory.mktemp("blind-spots") / "towerflow") as settings:
        yield settings


def _copy(settings: Settings, dst: Path, edit: Callable[[object, pd.DataFrame], pd.DataFrame]) -> str:
    """The world's source at ``dst`` with each day's events passed through ``edit(day, events)``."""
    from towerflow.data.source import ParquetSink, ParquetSource

    src, sink = ParquetSource(settings.source), ParquetSink(str(dst))
    sink.write_users(src.read_users())
    sink.write_items(src.read_items())
    sink.write_record(src.feedback(), src.empty_days())
    for day in src.days():
        sink.write_events_day(day, edit(day, src.read_day(day)))
    return str(dst)


def _retrain_fails_at_the_data_gate(source: str, pattern: str) -> None:
    from towerflow.flows.retrain import retrain
    from towerflow.flows.stages import StageFailed

    with pytest.raises(StageFailed, match=rf"(?s)stage 'validate_data' failed: .*{pattern}"):
        retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=tiny_retrain_config(), source_uri=source)


def test_rows_off_their_partition_day_fail_the_gate(world: Settings, tmp_path):
    def misfile(day, ev: pd.DataFrame) -> pd.DataFrame:
        if day != JAN3:
            return ev
        ev = ev.copy()
        ev.loc[ev.index[:6], "ts"] = ev.ts.iloc[:6] + pd.DateOffset(years=4)  # 2030
        ev.loc[ev.index[6], "ts"] = ev.ts.iloc[6] - pd.DateOffset(years=1)  # 2025
        return ev

    _retrain_fails_at_the_data_gate(_copy(world, tmp_path / "src", misfile),
                                    r"events\.ts on partition day: 7 row\(s\) of the window's partitions have a ts "
                                    r"outside their partition's day, 7 of them outside the window; extract kept "
                                    r"none of them \(dt=2026-01-03: 7\); allowed 0")


def test_an_empty_partition_inside_the_window_fails_the_gate(world: Settings, tmp_path):
    source = _copy(world, tmp_path / "src", lambda day, ev: ev.iloc[:0] if day == JAN3 else ev)
    _retrain_fails_at_the_data_gate(source, r"events\.every day has events: 1 of 4 day\(s\) of the window have no "
                                            r"events; allowed 0.*2026-01-03")


def test_an_empty_last_day_fails_the_gate_not_build_examples(world: Settings, tmp_path):
    source = _copy(world, tmp_path / "src", lambda day, ev: ev.iloc[:0] if day == JAN4 else ev)
    _retrain_fails_at_the_data_gate(source, r"events\.last day has events: 0 events on the window's last day "
                                            r"2026-01-04")
