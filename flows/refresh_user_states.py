"""Refresh the offline user history states (docs/architecture.md): the hourly ``refresh-user-states`` deployment,
and a subflow of the retrain flow right after it promotes (``RetrainConfig.refresh_user_states``).

    load the release (the champion by default) -> which users acted since this release's last refresh ->
    read their histories (the release's max_history_days) -> h = encode_history(...) -> write the states

Every user with a history keeps a state. The refresh is incremental: a state depends only on the user's history
(tasks/history.py: time gaps are measured from the user's own latest action, not from the refresh time), so only
users with an action since the release's last refresh (the store's ``last_as_of``) are recomputed; the first refresh
of a release, or one whose as_of is not after the last, computes every user. States of releases other than the
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
    incremental_since: datetime | None = None  # the previous refresh of this release; None: every user computed


def _load(settings: Settings, release: str):
    """``release``: an alias (champion), a registered version number, or a release id."""
    from towerflow.infra.promote import resolve_version
    from towerflow.infra.releases import load_release, load_release_version

    if release.isdigit() or release.startswith("r-"):
        return load_release_version(settings, resolve_version(release, settings))
    return load_release(settings, release)


@stage("load_release", io_retries=2)
def load_serving_release(settings: Settings, release: str):
    from towerflow.serving.bundle import build_bundle

    bundle = build_bundle(_load(settings, release), users=None)
    get_run_logger().info(f"computing states with release {bundle.release_id} (version {bundle.release.version})")
    return bundle


@stage("read_events", io_retries=2)
def read_events(settings: Settings, source_uri: str | None, as_of: datetime | None, lookback_days: int,
                since: datetime | None):
    from towerflow.data.source import ParquetSource
    from towerflow.serving.history import source_horizon
    from towerflow.serving.states import refresh_events

    source = ParquetSource(source_uri or settings.source)
    as_of = source_horizon(source.days()) if as_of is None else (
        as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC))
    events, incremental = refresh_events(source, as_of, lookback_days, since)
    start = as_of - timedelta(days=lookback_days)
    get_run_logger().info(f"{len(events):,} history actions in [{start}, {as_of})" + (
        f" of the {len(set(events.user_id.tolist())):,} users who acted since {since}" if incremental else ""))
    return events, as_of, incremental


@stage("compute_states")
def compute_states(bundle, events, as_of: datetime, max_seen: int, batch_size: int) -> list:
    from towerflow.serving.states import compute_user_states
    from towerflow.tasks.history import to_us

    return list(compute_user_states(bundle.release, bundle.vocab, events, to_us(as_of), bundle.history,
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


def last_refresh(settings: Settings, release_id: str) -> datetime | None:
    """When ``release_id``'s states were last refreshed; None (refresh every user) when the store cannot say: a
    store that cannot be read here fails where the states are written, as without an incremental refresh."""
    from towerflow.serving.state_store import SQLiteUserStateStore, StateStoreError

    try:
        store = SQLiteUserStateStore(settings.user_states_path)
    except StateStoreError as exc:
        get_run_logger().warning(f"{exc}: refreshing every user")
        return None
    try:
        return store.last_as_of(release_id)
    finally:
        store.close()


@flow(name="refresh-user-states", log_prints=True)
def refresh_user_states(
    release: str = "champion",
    as_of: datetime | None = None,
    lookback_days: int | None = None,
    source_uri: str | None = None,
    max_seen: int = 1000,
    batch_size: int = 1024,
    keep_releases: int = 3,
    incremental: bool = True,
) -> RefreshResult:
    """Store h for every user with a history at ``as_of`` (incrementally: see the module docstring).

    ``as_of`` None: the source's horizon (now, or where replayed data ends). ``release``: alias, version or id.
    ``lookback_days`` None: the release's ``max_history_days`` (histories never reach further back).
    """
    import time

    from prefect.artifacts import create_markdown_artifact

    t0 = time.perf_counter()
    settings = Settings()
    bundle = load_serving_release(settings, release)
    lookback_days = lookback_days or bundle.history.max_history_days
    since = last_refresh(settings, bundle.release_id) if incremental else None
    events, as_of, is_incremental = read_events(settings, source_uri, as_of, lookback_days, since)
    states = compute_states(bundle, events, as_of, max_seen, batch_size) if len(events) else []
    pruned = write_states(settings, states, keep_releases)
    result = RefreshResult(release_id=bundle.release_id, version=bundle.release.version, as_of=as_of,
                           lookback_days=lookback_days, n_events=len(events), n_users=len(states),
                           seconds=round(time.perf_counter() - t0, 3), store=str(settings.user_states_path),
                           pruned_releases=pruned, incremental_since=since if is_incremental else None)
    create_markdown_artifact(key="user-states", description=f"{len(states)} states for {bundle.release_id}",
                             markdown="\n".join(["| field | value |", "| --- | --- |",
                                                 *(f"| {k} | {v} |" for k, v in result.model_dump().items())]))
    what = f"users who acted since {since}" if is_incremental else "every user with a history"
    get_run_logger().info(f"stored {len(states):,} user states ({what}) for release {bundle.release_id} as of {as_of}")
    return result
