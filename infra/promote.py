"""Register a release in the MLflow registry as ONE model version, promote it by one alias flip, roll back.

Format choice. A release is registered by logging its directory verbatim as run artifacts
(``MlflowClient.log_artifacts`` under ``releases/<release_id>``) and creating one model version whose source is
that path, rather than as an ``mlflow.pyfunc`` model with ``artifacts={...}``:

- the version's artifacts are exactly the release directory whose every file ``release.json`` checksums, and the
  user tower stays in the format its writer chose (``models.two_tower.save_model``: weights + config), not the
  ``pt2`` (torch.export) format ``mlflow.pytorch`` defaults to, nor a cloudpickled Python class whose import path
  must stay valid and whose unpickling runs code;
- every call goes through an ``MlflowClient`` bound to the Settings: no process-wide tracking URI, no active run,
  so promotions and loaders for several stores can share a process (and tests can run them in threads);
- it is a little faster: 0.10 s to register a 10k-item release (6.7 MB), 0.19-0.24 s at 100k items (82 MB),
  against 0.16 s / 0.21 s for ``pyfunc.log_model(artifacts=..., pip_requirements=...)`` + ``register_model``,
  whose first call in a process also costs about 0.8 s of imports (2-core dev machine).
What is given up: ``mlflow.pyfunc.load_model`` cannot open the version; ``infra.releases.load_release`` is the
one loader, and it verifies what it loads.

Promotion protocol (docs/architecture.md, "Releases"): with the promotion lease held (``infra/lease.py``: a lease on
the data root that its holder renews while alive and that frees itself when the holder dies, so two promotions on
one data root exclude each other and a crashed one blocks nobody; the loser fails at once, or waits ``wait_s``
seconds and then fails naming the holder), the target release is fetched and verified, the current champion is read,
the previous champion is recorded (tag ``previous_champion`` on the target, alias ``previous``), the champion alias
is read again and the promotion fails if it moved (the guard for promoters that do not share the lock, e.g. on other
machines), and then ``champion`` is flipped: the one atomic switch. A crash before the flip leaves the old champion
served whole; after it, the new one. Rollback points ``champion`` at the champion's recorded predecessor in one
call.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from towerflow.config import Settings
from towerflow.errors import TowerflowError
from towerflow.infra.lease import Lease, LeaseHeldError, LeaseLostError, OnWait, lease
from towerflow.infra.releases import (
    CHAMPION,
    MANIFEST,
    TAG_BASE_RELEASE,
    TAG_MANIFEST_SHA,
    TAG_RELEASE_ID,
    ReleaseIntegrityError,
    ReleaseNotFoundError,
    check_release_id,
    fetch_base,
    fetch_release,
    file_sha256,
    verify_release,
)
from towerflow.infra.tracking import get_or_create_experiment, tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

PREVIOUS_ALIAS = "previous"
TAG_PREVIOUS = "previous_champion"
STEPS = ("artifacts_logged", "registered", "locked", "previous_recorded", "before_flip", "flipped")
OnStep = Callable[[str], None] | None
LEASE_S = 60.0  # default of PromotionConfig.lease_s: a dead holder on another host blocks at most this long


class PromotionError(TowerflowError):
    """A promotion or rollback could not be done; the champion is unchanged."""


class PromotionConflictError(PromotionError):
    """Another promotion ran at the same time (lease held, or the champion moved under us)."""


class PromotionTimeoutError(PromotionConflictError):
    """Waited for the promotion lease as long as allowed; another live promotion still holds it."""


def _step(on_step: OnStep, name: str) -> None:
    """Named points of the protocol; tests inject crashes here (``on_step`` raising)."""
    if on_step is not None:
        on_step(name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def release_versions(client: MlflowClient, name: str, release_id: str | None = None) -> list[ModelVersion]:
    flt = f"name = '{name}'" + (f" and tag.{TAG_RELEASE_ID} = '{release_id}'" if release_id is not None else "")
    return sorted(client.search_model_versions(flt), key=lambda mv: int(mv.version))


def register_release(release_dir: str | Path, run_id: str | None, settings: Settings, *,
                     on_step: OnStep = None) -> int:
    """Log a verified release directory to the run ``run_id`` (a new run when None) and register it as one
    version of ``settings.registered_model``, tagged with its release id; returns the version.

    Idempotent: a release that already has a version returns that version (a resumed flow does not register twice).
    """
    from mlflow.exceptions import MlflowException

    release_dir = Path(release_dir)
    manifest = verify_release(release_dir)
    rid, name = manifest.release_id, settings.registered_model
    client = tracking_client(settings)
    if existing := release_versions(client, name, rid):
        return int(existing[0].version)
    created_run = run_id is None
    if run_id is None:
        run_id = client.create_run(get_or_create_experiment(settings, client), run_name=f"release-{rid}").info.run_id
    status = "FAILED"
    try:
        artifact_path = f"releases/{rid}"
        client.log_artifacts(run_id, str(release_dir), artifact_path)
        client.set_tag(run_id, TAG_RELEASE_ID, rid)
        _step(on_step, "artifacts_logged")
        try:
            client.create_registered_model(name, description="towerflow releases: user tower + item index")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {
            TAG_RELEASE_ID: rid,
            TAG_MANIFEST_SHA: manifest.sha256,
            "snapshot_id": manifest.snapshot_id,
            "model_version": manifest.model_version,
            "created_at": manifest.created_at,
            "index_kind": str(manifest.index.get("kind", "")),
            "n_items": str(manifest.index.get("n_items", "")),
            "metrics": json.dumps(manifest.metrics, sort_keys=True),
            **({TAG_BASE_RELEASE: manifest.base["release_id"]} if manifest.base else {}),
        }
        # Tags go in with the version in one call: no version is ever visible without its release id.
        mv = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                         description=f"release {rid}")
        _step(on_step, "registered")
        status = "FINISHED"
    finally:
        if created_run:
            client.set_terminated(run_id, status)
    return int(mv.version)


@dataclass
class PromotionResult:
    version: int
    release_id: str
    previous_version: int | None
    changed: bool
    seconds: float

    def __str__(self) -> str:
        if not self.changed:
            return f"version {self.version} (release {self.release_id}) is already {CHAMPION}"
        prev = f"; previous: version {self.previous_version}" if self.previous_version is not None else ""
        return f"{CHAMPION} -> version {self.version} (release {self.release_id}){prev} in {self.seconds:.2f}s"


def lease_path(settings: Settings) -> Path:
    """The promotion lease of ``settings.registered_model`` on this data root."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.registered_model)
    return settings.data_root / "locks" / f"promote-{safe}.lease"


def _champion(client: MlflowClient, name: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return None
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


def _exists(client: MlflowClient, name: str, version: int) -> bool:
    try:
        _get_version(client, name, version)
    except (ReleaseNotFoundError, ReleaseIntegrityError):
        return False
    return True


def _get_version(client: MlflowClient, name: str, version: int) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ReleaseNotFoundError(f"registered model {name!r} has no version {version}") from exc
    if TAG_RELEASE_ID not in mv.tags:
        raise ReleaseIntegrityError(f"version {version} of {name!r} has no {TAG_RELEASE_ID} tag: not a release")
    return mv


def promotion_lease(stack: ExitStack, settings: Settings, what: str, *, wait_s: float = 0.0,
                    lease_s: float = LEASE_S, on_wait: OnWait = None) -> Lease:
    """Hold the promotion lease for the rest of ``stack``; ``PromotionConflictError`` (``wait_s`` 0) or
    ``PromotionTimeoutError`` naming the holder when another live promotion keeps it."""
    name = settings.registered_model
    try:
        return stack.enter_context(lease(lease_path(settings), note=what, lease_s=lease_s, wait_s=wait_s,
                                         on_wait=on_wait))
    except LeaseHeldError as exc:
        error = PromotionTimeoutError if wait_s > 0 else PromotionConflictError
        raise error(f"another promotion of {name!r} is in progress ({exc}); nothing was changed, retry when it has "
                    "finished") from exc


def _flip(client: MlflowClient, name: str, target: int, before: int | None, on_step: OnStep, held: Lease) -> None:
    """Compare-and-set on the champion alias: re-check the lease and re-read the alias just before the flip, fail
    if either moved."""
    _step(on_step, "before_flip")
    try:
        held.check()
    except LeaseLostError as exc:
        raise PromotionConflictError(f"{exc}; nothing was changed by this promotion of version {target}") from exc
    now = _champion(client, name)
    if now != before:
        raise PromotionConflictError(f"{CHAMPION} of {name!r} moved from version {before} to {now} during this "
                                     f"promotion of version {target}; nothing was changed by this promotion")
    client.set_registered_model_alias(name, CHAMPION, str(target))  # THE switch point
    _step(on_step, "flipped")


def promote(version: int, settings: Settings, *, expected_champion: int | None | str = "any",
            verify: bool = True, on_step: OnStep = None, wait_s: float = 0.0, lease_s: float = LEASE_S,
            on_wait: OnWait = None, note: str = "") -> PromotionResult:
    """Make registered ``version`` the champion with one alias flip, recording the previous champion first.

    ``expected_champion``: the version the caller's gate compared against (None: no champion); the promotion
    fails if the champion is another one. ``verify``: fetch and verify the release before it can be served.
    ``wait_s``: how long to wait for another promotion's lease (told to ``on_wait``); ``lease_s``: how long this
    one's lease outlives a crash of this process on another host; ``note`` tells waiters who holds it. Raises ``PromotionConflictError`` when another
    promotion holds the lease (``PromotionTimeoutError`` after waiting) or moves the champion meanwhile.
    """
    t0 = time.perf_counter()
    client, name = tracking_client(settings), settings.registered_model
    with ExitStack() as stack:
        what = f"promoting version {version} of {name}" + (f", {note}" if note else "")
        held = promotion_lease(stack, settings, what, wait_s=wait_s,
                               lease_s=lease_s, on_wait=on_wait)
        _step(on_step, "locked")
        mv = _get_version(client, name, version)
        rid = mv.tags[TAG_RELEASE_ID]
        if verify:
            _fetch_whole(settings, version, client)
        before = _champion(client, name)
        if before == int(version):  # first: a retry after this very flip succeeded is done, not a conflict
            return PromotionResult(int(version), rid, _int(mv.tags.get(TAG_PREVIOUS)), False,
                                   time.perf_counter() - t0)
        if expected_champion != "any" and before != expected_champion:
            raise PromotionConflictError(f"{CHAMPION} of {name!r} is version {before}, not the expected "
                                         f"{expected_champion}: the candidate was gated against another champion")
        if before is None:
            if TAG_PREVIOUS in mv.tags:  # left by an earlier, crashed attempt
                client.delete_model_version_tag(name, str(version), TAG_PREVIOUS)
        else:
            client.set_model_version_tag(name, str(version), TAG_PREVIOUS, str(before))
            client.set_registered_model_alias(name, PREVIOUS_ALIAS, str(before))
        _step(on_step, "previous_recorded")
        _flip(client, name, int(version), before, on_step, held)
        client.set_model_version_tag(name, str(version), "promoted_at", _now())
    return PromotionResult(int(version), rid, before, True, time.perf_counter() - t0)


def _fetch_whole(settings: Settings, version: int, client: MlflowClient) -> None:
    """Fetch and verify a release before it can be served, with its base when it is ranker-only."""
    manifest = fetch_release(settings, version, client)
    if manifest.base:
        fetch_base(settings, manifest, client)


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def rollback(settings: Settings, *, verify: bool = True, on_step: OnStep = None, wait_s: float = 0.0,
             on_wait: OnWait = None) -> PromotionResult:
    """Point ``champion`` back at the release that was champion before the current one, in one alias flip.

    Repeated rollbacks walk further back along the recorded chain. The ``previous`` alias then names the new
    champion's own predecessor (or is removed when there is none).
    """
    t0 = time.perf_counter()
    client, name = tracking_client(settings), settings.registered_model
    with ExitStack() as stack:
        held = promotion_lease(stack, settings, f"rolling back {name}", wait_s=wait_s, on_wait=on_wait)
        _step(on_step, "locked")
        current = _champion(client, name)
        if current is None:
            raise ReleaseNotFoundError(f"registered model {name!r} has no {CHAMPION}: nothing to roll back")
        cur = _get_version(client, name, current)
        target = _int(cur.tags.get(TAG_PREVIOUS))
        if target is None:
            raise PromotionError(f"version {current} (release {cur.tags[TAG_RELEASE_ID]}) has no previous champion "
                                 "recorded: nothing to roll back to")
        tgt = _get_version(client, name, target)
        if verify:
            _fetch_whole(settings, target, client)
        _flip(client, name, target, current, on_step, held)
        client.set_model_version_tag(name, str(current), "rolled_back_at", _now())
        # the predecessor may be gone (``towerflow release gc`` keeps the champion and ITS predecessor only)
        if (pp := _int(tgt.tags.get(TAG_PREVIOUS))) is not None and _exists(client, name, pp):
            client.set_registered_model_alias(name, PREVIOUS_ALIAS, str(pp))
        else:
            client.delete_registered_model_alias(name, PREVIOUS_ALIAS)
    return PromotionResult(target, tgt.tags[TAG_RELEASE_ID], current, True, time.perf_counter() - t0)


@dataclass
class ReleaseInfo:
    """One registered release, as ``towerflow release list/show`` prints it."""

    version: int
    release_id: str
    aliases: list[str]
    created_at: str
    snapshot_id: str
    model_version: str
    index_kind: str
    n_items: int | None
    metrics: dict[str, float]
    previous_champion: int | None
    promoted_at: str | None
    run_id: str | None
    source: str
    manifest_sha256: str
    checksums: dict[str, str] | None = None  # show only: sha256 of every artifact file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _info(mv: ModelVersion, aliases: dict[str, str]) -> ReleaseInfo:
    t = mv.tags
    return ReleaseInfo(
        version=int(mv.version), release_id=t.get(TAG_RELEASE_ID, ""),
        aliases=sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
        created_at=t.get("created_at", ""), snapshot_id=t.get("snapshot_id", ""),
        model_version=t.get("model_version", ""), index_kind=t.get("index_kind", ""),
        n_items=_int(t.get("n_items")), metrics=json.loads(t.get("metrics") or "{}"),
        previous_champion=_int(t.get(TAG_PREVIOUS)), promoted_at=t.get("promoted_at"), run_id=mv.run_id,
        source=mv.source, manifest_sha256=t.get(TAG_MANIFEST_SHA, ""),
    )


def list_releases(settings: Settings) -> list[ReleaseInfo]:
    """Every registered release of ``settings.registered_model``, newest version first (tags only, no download)."""
    from mlflow.exceptions import MlflowException

    client, name = tracking_client(settings), settings.registered_model
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return []
    return [_info(mv, aliases) for mv in reversed(release_versions(client, name))]


class InvalidReleaseRefError(PromotionError):
    """A release reference that is neither a version number nor a release id (empty, blank, malformed)."""


def check_ref(ref: str | int) -> str | int:
    """``ref`` as given when it is a version number (>= 1) or a release id; else ``InvalidReleaseRefError``."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        if ref < 1:
            raise InvalidReleaseRefError(f"version {ref} does not exist: versions start at 1")
        return ref
    text = str(ref).strip()
    if not text:
        raise InvalidReleaseRefError("the release id is empty: give a release id (r-YYYYmmddTHHMMSS-<6 hex>) or a "
                                     "registered version number")
    if text.isdigit():
        return check_ref(int(text))
    try:
        return check_release_id(text)
    except ReleaseIntegrityError as exc:
        raise InvalidReleaseRefError(f"{exc}, nor a registered version number") from None


def resolve_version(ref: str | int, settings: Settings, client: MlflowClient | None = None) -> int:
    """A version number, or a release id looked up by its tag; ``InvalidReleaseRefError`` for anything else
    (an empty id must never drop the tag filter and pick some version)."""
    ref = check_ref(ref)
    if isinstance(ref, int):
        return ref
    client, name = client or tracking_client(settings), settings.registered_model
    found = release_versions(client, name, ref)
    if not found:
        raise ReleaseNotFoundError(f"no version of {name!r} holds release {ref}")
    return int(found[0].version)


def show_release(ref: str | int, settings: Settings) -> ReleaseInfo:
    """One release with the sha256 of every artifact, read from its registered release.json (verified against
    the sha256 recorded at registration; only that file is downloaded)."""
    import mlflow.artifacts

    client, name = tracking_client(settings), settings.registered_model
    version = resolve_version(ref, settings, client)
    mv = _get_version(client, name, version)
    info = _info(mv, client.get_registered_model(name).aliases)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/{MANIFEST}", dst_path=tmp,
                                                   tracking_uri=settings.tracking_uri)
        if file_sha256(path) != info.manifest_sha256:
            raise ReleaseIntegrityError(f"{MANIFEST} of release {info.release_id} (version {version}) does not "
                                        "match the sha256 recorded at registration")
        info.checksums = json.loads(Path(path).read_text())["files"]
    return info
