"""Refresh the offline user history states (DESIGN.md section 7): the hourly ``refresh-user-states`` deployment,
and a subflow of the retrain flow right after it promotes (``RetrainConfig.refresh_user_states``).

    load the release (the champion by default) -> read the last lookback_days of events -> h = encode_history(...)
    for every active user -> write the states, tagged with the release id, to the user-state store

Active users are those with at least one non-impression action, on an item the release knows, in the window.
Histories are built as for training (serving/history.py) with gaps measured from ``as_of``; the service's online
path reads the same window, so a stored state equals what it would compute. States of releases other than the
newest ``keep_releases`` written are dropped (the previous champion's stay, for a rollback).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger
from pydantic import BaseModel

from towerflow.config import Settings
from towerflow.flows.stages import stage


class RefreshResult(BaseModel):
    release_id: str
    version: int | None
    as_of: datetime
    lookback_days: int
    n_events: int
    n_users: int
    seconds: float
    store: str
    pruned_releases: list[str] = []


def _load(settings: Settings, release: str):
    """``release``: an alias (champion), a registered version number, or a release id."""
    from dataclasses import replace

    from towerflow.infra.promote import resolve_version
    from towerflow.infra.releases import fetch_release, load_release, load_release_dir

    if release.isdigit() or release.startswith("r-"):
        version = resolve_version(release, settings)
        manifest = fetch_release(settings, version)
        return replace(load_release_dir(manifest.path, manifest=manifest), version=version)
    return load_release(settings, release)


@stage("load_release", io_retries=2)
def load_serving_release(settings: Settings, release: str):
    from towerflow.serving.bundle import build_bundle

    bundle = build_bundle(_load(settings, release), users=None)
    get_run_logger().info(f"computing states with release {bundle.release_id} (version {bundle.release.version})")
    return bundle


@stage("read_events", io_retries=2)
def read_events(settings: Settings, source_uri: str | None, as_of: datetime | None, lookback_days: int):
    from towerflow.data.source import ParquetSource
    from towerflow.serving.history import EventArrays, source_horizon

    source = ParquetSource(source_uri or settings.source)
    as_of = source_horizon(source.days()) if as_of is None else (
        as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC))
    events = EventArrays.from_events(source.read_events(as_of - timedelta(days=lookback_days), as_of))
    get_run_logger().info(f"{len(events):,} history actions in [{as_of - timedelta(days=lookback_days)}, {as_of})")
    return events, as_of


@stage("compute_states")
def compute_states(bundle, events, as_of: datetime, max_seen: int, batch_size: int) -> list:
    from towerflow.serving.history import to_us
    from towerflow.serving.states import compute_user_states

    return list(compute_user_states(bundle.release, bundle.vocab, events, to_us(as_of), bundle.max_seq_len,
                                    max_seen, batch_size, bundle.item_table))


@stage("write_states", io_retries=2)
def write_states(settings: Settings, states: list, keep_releases: int) -> list[str]:
    from towerflow.serving.state_store import SQLiteUserStateStore

    store = SQLiteUserStateStore(settings.user_states_path)
    try:
        store.put(states)
        return store.prune(keep_releases)
    finally:
        store.close()


@flow(name="refresh-user-states", log_prints=True)
def refresh_user_states(
    release: str = "champion",
    as_of: datetime | None = None,
    lookback_days: int = 7,
    source_uri: str | None = None,
    max_seen: int = 200,
    batch_size: int = 1024,
    keep_releases: int = 3,
) -> RefreshResult:
    """Compute and store h for every user active in ``[as_of - lookback_days, as_of)`` with ``release``.

    ``as_of`` None: the source's horizon (now, or where replayed data ends). ``release``: alias, version or id.
    """
    import time

    from prefect.artifacts import create_markdown_artifact

    t0 = time.perf_counter()
    settings = Settings()
    bundle = load_serving_release(settings, release)
    events, as_of = read_events(settings, source_uri, as_of, lookback_days)
    states = compute_states(bundle, events, as_of, max_seen, batch_size)
    pruned = write_states(settings, states, keep_releases)
    result = RefreshResult(release_id=bundle.release_id, version=bundle.release.version, as_of=as_of,
                           lookback_days=lookback_days, n_events=len(events), n_users=len(states),
                           seconds=round(time.perf_counter() - t0, 3), store=str(settings.user_states_path),
                           pruned_releases=pruned)
    create_markdown_artifact(key="user-states", description=f"{len(states)} states for {bundle.release_id}",
                             markdown="\n".join(["| field | value |", "| --- | --- |",
                                                 *(f"| {k} | {v} |" for k, v in result.model_dump().items())]))
    get_run_logger().info(f"stored {len(states):,} user states for release {bundle.release_id} as of {as_of}")
    return result
