"""Garbage collection of releases: what failed runs and superseded promotions leave behind, without bound.

A release lives in up to four places: its directory ``<data_root>/releases/<id>`` (written by every retrain that
gets as far as ``assemble_release``, promoted or not), a registered model version (every retrain that passes its
gates, and every crashed promotion), that version's logged artifacts in the tracking store, and a verified copy in
``<data_root>/release_cache/<id>`` (wherever a release was loaded). ``gc`` keeps a release, in all four places,
when anything may still need it:

- an alias points at its version (``champion``, ``previous`` or any other);
- it is the champion's recorded predecessor (``previous_champion``: what ``towerflow release rollback`` goes to);
- the backfill ledger names it (a backfilled day records the release it built);
- it is one of the newest ``keep`` releases (ids sort by creation time);
- it is the base of a release kept for any reason above (a ranker-only release serves its base's files);
- it is younger than ``min_age_hours`` (``Settings.release_gc_min_age_hours``, 24 h): a retrain between writing its
  release and promoting it, even when a backfill wrote more than ``keep`` newer ones meanwhile.

gc sees only its own data root: the backfill ledger it reads is ``<data_root>/backfill/ledger.sqlite``; a backfill
run with another data root (or another machine's) protects nothing here beyond the rules above.

Everything else goes: the version is deleted from the registry first, then its artifacts, then the local copies
(the other order could leave a registered version whose files are gone). Leftover temporaries of a crashed write
or download (``.tmp-*``, ``.dl-*``) older than an hour go too. The promotion lease is held throughout, so no alias
moves while gc decides. ``dry_run`` only reports.
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from towerflow.backfill import Ledger
from towerflow.config import Settings
from towerflow.errors import TowerflowError
from towerflow.infra.lease import OnWait
from towerflow.infra.promote import TAG_PREVIOUS, promotion_lease, release_versions
from towerflow.infra.releases import CHAMPION, TAG_BASE_RELEASE, TAG_RELEASE_ID, cache_dir, is_release_id
from towerflow.infra.tracking import tracking_client

STALE_TMP_S = 3600.0  # a temporary younger than this may belong to a write or download in progress


@dataclass
class GcResult:
    kept: dict[str, str] = field(default_factory=dict)  # release id -> why
    removed_versions: dict[int, str] = field(default_factory=dict)  # version -> release id
    removed_paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be removed, and why
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"kept {rid} ({why})" for rid, why in sorted(self.kept.items())]
        out += [f"{verb} version {v} (release {rid})" for v, rid in sorted(self.removed_versions.items())]
        out += [f"{verb} {p}" for p in self.removed_paths]
        out += self.notes
        if not self.removed_versions and not self.removed_paths:
            out.append("nothing to remove")
        return out


def ledger_releases(settings: Settings) -> dict[str, str]:
    """Release ids the backfill ledger records, with the day each was built for."""
    ledger = Ledger(settings.data_root / "backfill" / "ledger.sqlite")
    return {e.release_id: f"backfill ledger, {e.day}" for e in ledger.entries() if e.release_id}


def _local(root: Path) -> dict[str, Path]:
    """Release directories under ``root`` by release id (temporaries and anything else are not releases)."""
    if not root.is_dir():
        return {}
    return {p.name: p for p in root.iterdir() if p.is_dir() and is_release_id(p.name)}


def _stale_temporaries(roots: list[Path], now: float) -> list[Path]:
    return sorted(p for root in roots if root.is_dir() for p in root.iterdir()
                  if p.is_dir() and p.name.startswith((".tmp-", ".dl-")) and now - p.stat().st_mtime > STALE_TMP_S)


def release_created(release_id: str) -> float:
    """The creation time a release id records (``r-YYYYmmddTHHMMSS-...``, UTC), epoch seconds."""
    return datetime.strptime(release_id[2:17], "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp()


def gc_releases(settings: Settings, *, keep: int = 3, min_age_hours: float | None = None, dry_run: bool = False,
                wait_s: float = 0.0, on_wait: OnWait = None, now: float | None = None) -> GcResult:
    """Remove every release nothing references (see the module docstring); ``keep`` >= 1 newest are kept, and
    every release younger than ``min_age_hours`` (default ``settings.release_gc_min_age_hours``)."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if keep < 1:
        raise TowerflowError(f"--keep must be at least 1 (got {keep}): the newest release may be a retrain's "
                             "that is about to be promoted")
    min_age_hours = settings.release_gc_min_age_hours if min_age_hours is None else min_age_hours
    if min_age_hours < 0:
        raise TowerflowError(f"--min-age-hours must be >= 0 (got {min_age_hours})")
    now = time.time() if now is None else now
    client, name = tracking_client(settings), settings.registered_model
    result = GcResult(dry_run=dry_run)
    with ExitStack() as stack:
        promotion_lease(stack, settings, "towerflow release gc", wait_s=wait_s, on_wait=on_wait)
        try:
            aliases = client.get_registered_model(name).aliases
            versions = [mv for mv in release_versions(client, name) if TAG_RELEASE_ID in mv.tags]
        except MlflowException:  # no registered model yet: only local directories
            aliases, versions = {}, []
        by_version = {str(mv.version): mv for mv in versions}
        local, cached = _local(settings.releases_dir), _local(cache_dir(settings))
        for alias, v in aliases.items():
            if (mv := by_version.get(str(v))) is not None:
                result.kept[mv.tags[TAG_RELEASE_ID]] = f"alias {alias}"
        champion = by_version.get(str(aliases.get(CHAMPION)))
        if champion is not None and (prev := by_version.get(champion.tags.get(TAG_PREVIOUS, ""))) is not None:
            result.kept.setdefault(prev.tags[TAG_RELEASE_ID], "previous champion: the rollback target")
        for rid, why in ledger_releases(settings).items():
            result.kept.setdefault(rid, why)
        every = {mv.tags[TAG_RELEASE_ID] for mv in versions} | set(local) | set(cached)
        for rid in sorted(every, reverse=True)[:keep]:
            result.kept.setdefault(rid, f"one of the newest {keep}")
        for rid in sorted(every):
            if now - release_created(rid) < min_age_hours * 3600:
                result.kept.setdefault(rid, f"younger than {min_age_hours:g} h: a retrain may still promote it")

        for mv in versions:  # a kept ranker-only release serves its base's files: the base stays with it
            if mv.tags[TAG_RELEASE_ID] in result.kept and (base := mv.tags.get(TAG_BASE_RELEASE)):
                result.kept.setdefault(base, f"base of ranker-only release {mv.tags[TAG_RELEASE_ID]}")
        doomed = [mv for mv in versions if mv.tags[TAG_RELEASE_ID] not in result.kept]
        paths = [p for d in (local, cached) for rid, p in sorted(d.items()) if rid not in result.kept]
        paths += _stale_temporaries([settings.releases_dir, cache_dir(settings)], now)
        result.removed_versions = {int(mv.version): mv.tags[TAG_RELEASE_ID] for mv in doomed}
        result.removed_paths = paths
        if dry_run:
            return result
        for mv in doomed:
            client.delete_model_version(name, str(mv.version))  # first: never a version whose files are gone
            if mv.run_id:
                rid = mv.tags[TAG_RELEASE_ID]
                try:
                    repo = get_artifact_repository(client.get_run(mv.run_id).info.artifact_uri)
                    repo.delete_artifacts(f"releases/{rid}")
                    why = "this artifact store does not delete" if repo.list_artifacts(f"releases/{rid}") else None
                except (MlflowException, OSError) as exc:
                    why = str(exc)
                if why:
                    result.notes.append(f"the artifacts of release {rid} stay in run {mv.run_id}: {why}")
        for p in paths:
            shutil.rmtree(p)
    return result
