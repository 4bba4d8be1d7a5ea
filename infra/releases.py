"""Releases: the on-disk layout, the manifest with a checksum of every file, and the one loader serving trusts.

A release is one directory named by its id (``r-YYYYmmddTHHMMSS-<6 hex>``)::

    <releases_dir>/<release_id>/
        release.json            manifest: release_id, created_at, snapshot_id, model_version, metrics,
                                index summary, and the sha256 of EVERY other file below
        user_tower/             the user-tower model directory, copied as its writer saved it
        user_tower.json         sidecar: release_id, model_version
        item_embeddings.npy     (n, d) float32   } tasks.embed_items.ItemEmbeddings
        item_ids.npy            (n,) int64       }
        item_embeddings.json    sidecar: release_id, model_version, n, d, content hash
        index.faiss             FAISS index answering with real item ids
        index.json              sidecar: release_id, model_version, n, d, type, parameters, sha256 of
                                index.faiss, content hash of the embeddings it indexes, build time
        q_table.npy, q_table.json   optional: the logQ table and its sidecar
        vocab/, vocab.json          optional: id <-> index vocabularies and their sidecar
        ranker/, ranker.json        optional: the TransAct + DCN v2 ranker (models/ranker.py ``save_ranker``) and
                                its sidecar: release_id, model_version, the item table it is bound to, metrics
        config.json             release_id, model_version and the config that built it

The user tower and the index must never be served mismatched, so ``verify_release`` refuses a directory unless
every file is listed with the right sha256, nothing unlisted is present, and every sidecar names the same release
(and model version); the index's sidecar must also name the embeddings it was built from. The registry (see
infra/promote.py) holds a release as one model version whose artifacts are exactly this directory, and the
``release_sha256`` tag on that version pins release.json, so a consistently rewritten manifest is refused too.
``load_release`` resolves an alias to one version, downloads it into a local cache (only a verified copy is ever
renamed into place), verifies it, and loads index, ids, vectors, q table, model and ranker.

The ranker's item table is THIS release's item embeddings: ``ranker_item_table(item_embeddings.npy)``, row 0 zeros
(padding / unknown), row i = ``item_embeddings.npy[i - 1]``, i.e. the item ``item_ids.npy[i - 1]``. Those rows are the
release vocabulary's item indices (``Vocab.item_index``: the vocabulary's sorted ids, 1-based), which is how the
ranking examples number items; ``LoadedRelease.ranker_rows(item_ids)`` maps FAISS item ids to them (0 for an item the
release does not hold). ``load_ranker`` checks the table's fingerprint, so a ranker copied in from another release
(trained over other vectors) is refused even with its ids and checksums rewritten, unless the table hash recorded
with it is rewritten too; a copy rewritten that consistently is caught by the registry's pin on release.json.

A **ranker-only release** (the ``retrain-ranker`` flow) holds only ``release.json``, ``ranker/``, ``ranker.json`` and
``config.json``; its manifest names a ``base_release`` (release id, registered version, sha256 of its release.json)
whose user tower, embeddings, index, vocabulary and q table it serves by reference, never copied. Its ranker is bound
to the base's item table. Loading it fetches and verifies the base as well (pinned by that sha256), so promotion and
rollback still flip one alias: retriever and ranker together.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from towerflow.config import Settings
from towerflow.errors import TowerflowError
from towerflow.tasks.build_index import (  # checksum and search as IndexArtifact
    file_sha256,
    search_index,
)

if TYPE_CHECKING:
    import faiss
    from mlflow import MlflowClient

    from towerflow.models.ranker import Ranker
    from towerflow.tasks.build_index import IndexArtifact
    from towerflow.tasks.embed_items import ItemEmbeddings

MANIFEST = "release.json"
USER_TOWER_DIR = "user_tower"
USER_TOWER_META = "user_tower.json"
Q_TABLE = "q_table.npy"
Q_TABLE_META = "q_table.json"
VOCAB_DIR = "vocab"
VOCAB_META = "vocab.json"
RANKER_DIR, RANKER_META = "ranker", "ranker.json"
CONFIG = "config.json"
INDEX_FILE, INDEX_META = "index.faiss", "index.json"
EMB_VECTORS, EMB_IDS, EMB_META = "item_embeddings.npy", "item_ids.npy", "item_embeddings.json"
SIDECARS = (USER_TOWER_META, EMB_META, INDEX_META, Q_TABLE_META, VOCAB_META, RANKER_META, CONFIG)
REQUIRED = (USER_TOWER_META, EMB_VECTORS, EMB_IDS, EMB_META, INDEX_FILE, INDEX_META, CONFIG)
FORMAT_VERSION = 1

# Tags on the registered model version that holds a release (written by infra/promote.py).
TAG_RELEASE_ID = "release_id"
TAG_MANIFEST_SHA = "release_sha256"
TAG_BASE_RELEASE = "base_release_id"  # a ranker-only release's base, whose files it serves
CHAMPION = "champion"

_RELEASE_ID = re.compile(r"^r-\d{8}T\d{6}-[0-9a-f]{6}$")


class ReleaseIntegrityError(TowerflowError):
    """A release is incomplete, tampered with, or mixes artifacts of different releases; it must not be served."""


class ReleaseNotFoundError(TowerflowError):
    """No release answers to this alias, version or id."""


def new_release_id(now: datetime | None = None) -> str:
    """``r-YYYYmmddTHHMMSS-<6 hex>``: sortable by creation time (UTC), unique by its random suffix."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"r-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def is_release_id(name: str) -> bool:
    return isinstance(name, str) and _RELEASE_ID.match(name) is not None


def check_release_id(release_id: str) -> str:
    if not is_release_id(release_id):
        raise ReleaseIntegrityError(f"{release_id!r} is not a release id (expected r-YYYYmmddTHHMMSS-<6 hex>)")
    return release_id



@dataclass(frozen=True)
class ReleaseManifest:
    """What release.json says, plus where it was read and its own sha256 (the registry pins that)."""

    release_id: str
    created_at: str
    snapshot_id: str
    model_version: str
    metrics: dict[str, float]
    index: dict[str, Any]
    files: dict[str, str]  # relative posix path -> sha256, every file but release.json
    path: Path
    sha256: str
    base: dict[str, Any] | None = None  # ranker-only release: {release_id, version, manifest_sha256} of its base


def _list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReleaseIntegrityError(f"{path} cannot be read as JSON: {exc}") from exc


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def ranker_item_table(item_vectors: np.ndarray) -> np.ndarray:
    """A release's (n, d) item embeddings -> the (n + 1, d) float32 item table its ranker is bound to: row 0 zeros
    (padding / unknown), row i = ``item_vectors[i - 1]`` (module docstring)."""
    v = np.asarray(item_vectors, dtype=np.float32)
    return np.vstack([np.zeros((1, v.shape[1]), np.float32), v])


def ranker_rows(release_item_ids: np.ndarray, item_ids: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """(m,) item ids -> (m,) int64 rows of the ranker's item table (``release_item_ids`` position + 1; 0 where the
    release does not hold the item). ``order``: ``argsort(release_item_ids)``, if already computed."""
    ids = np.asarray(release_item_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable") if order is None else order
    want = np.asarray(item_ids, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, want, sorter=order), max(len(ids) - 1, 0))
    found = (ids[order[pos]] == want) if len(ids) else np.zeros(want.shape, bool)
    return np.where(found, order[pos] + 1, 0).astype(np.int64)


def _ranker_sidecar(ranker: Ranker, embeddings: ItemEmbeddings, tag: dict[str, str],
                    metrics: Mapping[str, float] | None) -> dict[str, Any]:
    """The ranker's sidecar; refuses a ranker trained over another item table than ``embeddings``."""
    from towerflow.models.ranker import table_fingerprint

    table = ranker_item_table(embeddings.vectors)
    sha = table_fingerprint(table)
    if table_fingerprint(ranker.item_vectors.cpu()) != sha:
        raise ReleaseIntegrityError(f"the ranker was trained over an item table {tuple(ranker.item_vectors.shape)} "
                                    f"that is not release {tag['release_id']}'s item embeddings {table.shape}")
    return {**tag, "item_table": {"vectors": EMB_VECTORS, "ids": EMB_IDS, "shape": list(table.shape),
                                  "rows": f"0 = padding / unknown (zeros), i = {EMB_VECTORS}[i - 1] = item "
                                          f"{EMB_IDS}[i - 1]",
                                  "embeddings_sha256": embeddings.content_sha256(), "sha256": sha},
            "dense_dim": ranker.dense_dim,
            "metrics": {k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)}}


def write_release(
    releases_dir: str | Path,
    *,
    release_id: str,
    user_tower_dir: str | Path,
    embeddings: ItemEmbeddings,
    index: IndexArtifact,
    config: Mapping[str, Any] | Any,
    snapshot_id: str,
    metrics: Mapping[str, float] | None = None,
    q_table: np.ndarray | None = None,
    vocab: str | Path | None = None,
    model_version: str | None = None,
    created_at: datetime | None = None,
    ranker: Ranker | None = None,
    ranker_metrics: Mapping[str, float] | None = None,
) -> ReleaseManifest:
    """Assemble ``<releases_dir>/<release_id>/`` from its artifacts and write the manifest; returns it verified.

    ``config``: a mapping or pydantic model (dumped to JSON). ``q_table``: (n_items + 1,) logQ table or None.
    ``vocab``: a file or directory copied under ``vocab/``. ``model_version`` defaults to the embeddings'.
    ``ranker``: a trained ranker over ``ranker_item_table(embeddings.vectors)`` (else refused), saved under
    ``ranker/`` with its held-out ``ranker_metrics`` in the sidecar.
    The directory is built under a temporary name and renamed into place, so a crash never leaves a directory
    that is named like a release but is incomplete.
    """
    check_release_id(release_id)
    model_version = embeddings.model_version if model_version is None else model_version
    for what, rid, mv in (("item embeddings", embeddings.release_id, embeddings.model_version),
                          ("index", index.release_id, index.model_version)):
        if rid != release_id:
            raise ReleaseIntegrityError(f"the {what} belong to release {rid}, not {release_id}")
        if mv != model_version:
            raise ReleaseIntegrityError(f"the {what} come from model {mv!r}, the release is model {model_version!r}")
    if index.embeddings_sha256 != embeddings.content_sha256():
        raise ReleaseIntegrityError("the index was not built from these item embeddings (content hash differs)")
    user_tower_dir = Path(user_tower_dir)
    if not user_tower_dir.is_dir() or not any(p.is_file() for p in user_tower_dir.rglob("*")):
        raise ReleaseIntegrityError(f"user tower directory {user_tower_dir} is missing or empty")

    releases_dir = Path(releases_dir)
    final = releases_dir / release_id
    if final.exists():
        raise ReleaseIntegrityError(f"{final} already exists: release ids are never reused")
    releases_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{release_id}-", dir=releases_dir))
    try:
        tag = {"release_id": release_id, "model_version": model_version}
        shutil.copytree(user_tower_dir, tmp / USER_TOWER_DIR)
        _write_json(tmp / USER_TOWER_META, tag)
        embeddings.save(tmp)
        index.save(tmp)
        if q_table is not None:
            np.save(tmp / Q_TABLE, np.asarray(q_table))
            _write_json(tmp / Q_TABLE_META, {**tag, "shape": list(np.shape(q_table))})
        if vocab is not None:
            vocab = Path(vocab)
            if vocab.is_dir():
                shutil.copytree(vocab, tmp / VOCAB_DIR)
            else:
                (tmp / VOCAB_DIR).mkdir()
                shutil.copy2(vocab, tmp / VOCAB_DIR / vocab.name)
            _write_json(tmp / VOCAB_META, tag)
        if ranker is not None:
            from towerflow.models.ranker import save_ranker

            sidecar = _ranker_sidecar(ranker, embeddings, tag, ranker_metrics)
            save_ranker(ranker, tmp / RANKER_DIR, release_id)
            _write_json(tmp / RANKER_META, sidecar)
        config_obj = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
        _write_json(tmp / CONFIG, {**tag, "config": config_obj})
        manifest = {
            "format_version": FORMAT_VERSION,
            "release_id": release_id,
            "created_at": (created_at or datetime.now(UTC)).astimezone(UTC).isoformat(),
            "snapshot_id": snapshot_id,
            "model_version": model_version,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "index": {"kind": index.kind, "factory": index.factory, "params": index.params,
                      "n_items": index.n_items, "dim": index.dim},
            "files": {rel: file_sha256(tmp / rel) for rel in _list_files(tmp)},
        }
        _write_json(tmp / MANIFEST, manifest)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify_release(final, expected_release_id=release_id)


def write_ranker_release(releases_dir: str | Path, *, release_id: str, base: ReleaseManifest, base_version: int,
                         ranker: Ranker, config: Mapping[str, Any] | Any, snapshot_id: str, model_version: str,
                         ranker_metrics: Mapping[str, float] | None = None,
                         created_at: datetime | None = None) -> ReleaseManifest:
    """Write a ranker-only release over the verified full release ``base`` (registered as ``base_version``):
    ``ranker`` (trained over the base's item table, else refused), its sidecar, ``config`` and a manifest naming the
    base. The base's files are referenced, not copied. Returns the manifest, verified."""
    from towerflow.models.ranker import save_ranker
    from towerflow.tasks.embed_items import ItemEmbeddings

    check_release_id(release_id)
    if base.base is not None:
        raise ReleaseIntegrityError(f"release {base.release_id} is itself ranker-only: use its base "
                                    f"{base.base['release_id']}")
    releases_dir = Path(releases_dir)
    final = releases_dir / release_id
    if final.exists():
        raise ReleaseIntegrityError(f"{final} already exists: release ids are never reused")
    tag = {"release_id": release_id, "model_version": model_version}
    sidecar = _ranker_sidecar(ranker, ItemEmbeddings.load(base.path), tag, ranker_metrics)
    releases_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{release_id}-", dir=releases_dir))
    try:
        save_ranker(ranker, tmp / RANKER_DIR, release_id)
        _write_json(tmp / RANKER_META, sidecar)
        config_obj = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
        _write_json(tmp / CONFIG, {**tag, "config": config_obj})
        _write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION, "release_id": release_id,
            "created_at": (created_at or datetime.now(UTC)).astimezone(UTC).isoformat(),
            "snapshot_id": snapshot_id, "model_version": model_version,
            "base_release": {"release_id": base.release_id, "version": int(base_version),
                             "manifest_sha256": base.sha256},
            # the retriever's figures are the base's; the ranker's are in ranker.json
            "metrics": base.metrics, "index": base.index,
            "files": {rel: file_sha256(tmp / rel) for rel in _list_files(tmp)}})
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify_release(final, expected_release_id=release_id)


def embed_release_items(model: Any, vocab: Any, model_version: str) -> ItemEmbeddings:
    """A trained model's item vectors for its vocabulary's items (ids 1..n), under a new release id."""
    from towerflow.tasks.embed_items import embed_items

    return embed_items(model.item_vectors, np.arange(1, vocab.n_items + 1), vocab.item_ids, new_release_id(),
                       model_version=model_version)


def assemble(releases_dir: str | Path, *, model: Any, vocab: Any, embeddings: ItemEmbeddings, index: IndexArtifact,
             config: Any, snapshot_id: str, candidate_metrics: Mapping[str, float], ranker: Ranker | None = None,
             ranker_metrics: Mapping[str, float] | None = None) -> ReleaseManifest:
    """Write the release of a trained ``model``: its user tower, ``vocab``, item ``embeddings`` and ``index`` under
    ``embeddings.release_id`` (``write_release``), with the candidate's metrics (less its sample count ``n``), and the
    optional ``ranker`` trained over these embeddings (``ranker_item_table``)."""
    from towerflow.models.two_tower import save_model

    with tempfile.TemporaryDirectory() as tmp:
        tower = save_model(model, Path(tmp) / "user_tower")
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(vocab.to_json())
        return write_release(releases_dir, release_id=embeddings.release_id, user_tower_dir=tower,
                             embeddings=embeddings, index=index, config=config, snapshot_id=snapshot_id,
                             metrics={k: v for k, v in candidate_metrics.items() if k != "n"},
                             q_table=model.log_q.numpy(), vocab=vocab_file, ranker=ranker,
                             ranker_metrics=ranker_metrics)


def verify_release(
    directory: str | Path,
    *,
    expected_release_id: str | None = None,
    expected_manifest_sha256: str | None = None,
) -> ReleaseManifest:
    """Check a release directory end to end; raise ``ReleaseIntegrityError`` naming the first bad file.

    Checks: release.json present (and, if given, its sha256 and release id as the registry recorded them);
    every listed file present with its sha256; no unlisted file; every required artifact present; every sidecar
    names this release id and model version; the index's sidecar names these embeddings and this index file; a
    ranker comes whole (``ranker/`` and its sidecar), saved for this release over these embeddings.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise ReleaseIntegrityError(f"{mpath} is missing: {directory} is not a release")
    msha = file_sha256(mpath)
    if expected_manifest_sha256 and msha != expected_manifest_sha256:
        raise ReleaseIntegrityError(f"{mpath} does not match the sha256 the registry recorded for it")
    m = _read_json(mpath)
    rid = check_release_id(m.get("release_id", ""))
    if expected_release_id and rid != expected_release_id:
        raise ReleaseIntegrityError(f"{mpath} is release {rid}, expected {expected_release_id}")
    listed: dict[str, str] = m.get("files", {})
    base = m.get("base_release")
    present = set(_list_files(directory)) - {MANIFEST}
    if missing := sorted(set(listed) - present):
        raise ReleaseIntegrityError(f"release {rid} is missing {', '.join(missing)} (in {directory})")
    if unlisted := sorted(present - set(listed)):
        raise ReleaseIntegrityError(f"{', '.join(unlisted)} in {directory} not listed in {MANIFEST} of release {rid}")
    for rel in (RANKER_META, CONFIG) if base else REQUIRED:
        if rel not in listed:
            raise ReleaseIntegrityError(f"release {rid} has no {rel}")
    if base:
        check_release_id(base.get("release_id", ""))
        if retrieval := sorted(rel for rel in listed if rel not in (RANKER_META, CONFIG)
                               and not rel.startswith(RANKER_DIR + "/")):
            raise ReleaseIntegrityError(f"ranker-only release {rid} holds {', '.join(retrieval)}: its retriever is "
                                        f"its base {base['release_id']}'s, by reference")
    elif not any(rel.startswith(USER_TOWER_DIR + "/") for rel in listed):
        raise ReleaseIntegrityError(f"release {rid} has an empty {USER_TOWER_DIR}/")
    for rel, sha in listed.items():
        if file_sha256(directory / rel) != sha:
            raise ReleaseIntegrityError(f"{directory / rel} does not match its sha256 in {MANIFEST} (tampered or "
                                        "corrupted)")
    model_version = m.get("model_version", "")
    sidecars = {name: _read_json(directory / name) for name in SIDECARS if name in listed}
    for name, meta in sidecars.items():
        if meta.get("release_id") != rid:
            raise ReleaseIntegrityError(f"{directory / name} belongs to release {meta.get('release_id')}, "
                                        f"not {rid}: artifacts of different releases must not be served together")
        if meta.get("model_version", model_version) != model_version:
            raise ReleaseIntegrityError(f"{directory / name} comes from model {meta.get('model_version')!r}, "
                                        f"release {rid} is model {model_version!r}")
    _verify_ranker(directory, rid, listed, sidecars)
    manifest = ReleaseManifest(rid, m.get("created_at", ""), m.get("snapshot_id", ""), model_version,
                               m.get("metrics", {}), m.get("index", {}), listed, directory, msha, base)
    if base:  # the embeddings the ranker is bound to are the base's: checked when both are loaded
        return manifest
    idx, emb = sidecars[INDEX_META], sidecars[EMB_META]
    if idx.get("index_sha256") != listed[INDEX_FILE]:
        raise ReleaseIntegrityError(f"{directory / INDEX_META} describes another index file than {INDEX_FILE}")
    if idx.get("embeddings_sha256") != emb.get("content_sha256"):
        raise ReleaseIntegrityError(f"{directory / INDEX_META} was built from other item embeddings than "
                                    f"{EMB_VECTORS}")
    if (idx.get("n_items"), idx.get("dim")) != (emb.get("n_items"), emb.get("dim")):
        raise ReleaseIntegrityError(f"{directory / INDEX_META} says {idx.get('n_items')}x{idx.get('dim')}, "
                                    f"{EMB_META} says {emb.get('n_items')}x{emb.get('dim')}")
    if RANKER_META in sidecars and (sidecars[RANKER_META].get("item_table", {}).get("embeddings_sha256")
                                    != emb.get("content_sha256")):
        raise ReleaseIntegrityError(f"{directory / RANKER_META}: the ranker is bound to other item embeddings than "
                                    f"{EMB_VECTORS}")
    return manifest


def _verify_ranker(directory: Path, rid: str, listed: Mapping[str, str], sidecars: Mapping[str, dict]) -> None:
    """Without loading torch: the ranker is whole, saved for release ``rid``, over this release's embeddings."""
    from towerflow.models.ranker import CONFIG_FILE, WEIGHTS_FILE

    in_dir = [rel for rel in listed if rel.startswith(RANKER_DIR + "/")]
    if not in_dir and RANKER_META not in listed:
        return
    for rel in (RANKER_META, f"{RANKER_DIR}/{CONFIG_FILE}", f"{RANKER_DIR}/{WEIGHTS_FILE}"):
        if rel not in listed:
            raise ReleaseIntegrityError(f"release {rid} has a ranker without {rel} (in {directory})")
    saved = _read_json(directory / RANKER_DIR / CONFIG_FILE)
    if saved.get("release_id") != rid:
        raise ReleaseIntegrityError(f"{directory / RANKER_DIR / CONFIG_FILE}: a ranker of release "
                                    f"{saved.get('release_id')}, not of release {rid}")
    table = sidecars[RANKER_META].get("item_table", {})
    if table.get("sha256") != saved.get("item_table", {}).get("sha256"):
        raise ReleaseIntegrityError(f"{directory / RANKER_META} and {RANKER_DIR}/{CONFIG_FILE} name different item "
                                    "tables")


@dataclass
class LoadedRelease:
    """Every artifact of one verified release, loaded: what serving swaps in as one unit."""

    release_id: str
    manifest: ReleaseManifest
    index: faiss.Index
    item_ids: np.ndarray  # (n,) int64
    item_vectors: np.ndarray  # (n, d) float32, memory-mapped
    q_table: np.ndarray | None
    config: dict[str, Any]
    vocab_dir: Path | None
    model: Any  # whatever load_model returned for user_tower/
    version: int | None = None  # registered model version, when loaded from the registry
    alias: str | None = None
    index_meta: dict[str, Any] = field(default_factory=dict)
    ranker: Ranker | None = None  # over ranker_item_table(item_vectors); None when the release has none

    @property
    def path(self) -> Path:
        return self.manifest.path

    @functools.cached_property
    def _item_order(self) -> np.ndarray:
        return np.argsort(self.item_ids, kind="stable")

    def ranker_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """(m,) item ids (e.g. from ``search``) -> (m,) int64 rows of the ranker's item table, 0 for unknown ids."""
        return ranker_rows(self.item_ids, item_ids, self._item_order)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (b, d) float32 -> (scores (b, k), item ids (b, k) int64; -1 where fewer than k items).
        An IVF-Flat index is searched deep enough for k items (``search_index``), as ``IndexArtifact.search`` is."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        meta = self.index_meta
        if not meta:
            return self.index.search(q, k)
        return search_index(self.index, meta["kind"], meta["params"], meta["n_items"], q, k)


def _default_load_model(path: Path) -> Any:
    from towerflow.models.two_tower import load_model

    return load_model(path)


def load_release_dir(
    directory: str | Path,
    load_model: Callable[[Path], Any] | None = None,
    *,
    expected_release_id: str | None = None,
    expected_manifest_sha256: str | None = None,
    manifest: ReleaseManifest | None = None,
    base_dir: str | Path | None = None,
) -> LoadedRelease:
    """Verify (unless an already verified ``manifest`` of this directory is given) and load a release directory.

    A ranker-only release loads its base from ``base_dir`` (default: the sibling directory named by the base's id),
    verified against the sha256 its manifest pins, and serves the base's retriever under its own id with its ranker.

    ``load_model(path_to_user_tower_dir)`` loads the user tower (default: ``models.two_tower.load_model``). A ranker,
    when the release has one, is loaded over the release's own item table for the release's id: one of another
    release is refused (ReleaseIntegrityError naming why).
    """
    from towerflow.tasks.build_index import IndexArtifact

    directory = Path(directory)
    manifest = manifest or verify_release(directory, expected_release_id=expected_release_id,
                                          expected_manifest_sha256=expected_manifest_sha256)
    if manifest.base is not None:
        return _load_ranker_only(directory, manifest, load_model, base_dir)
    # Checksums were verified just above: no need to hash the index file a second time.
    art = IndexArtifact.load(directory, verify=False)
    item_ids = np.load(directory / EMB_IDS)
    vectors = np.load(directory / EMB_VECTORS, mmap_mode="r")
    if art.index.ntotal != len(item_ids) or vectors.shape != (len(item_ids), art.dim):
        raise ReleaseIntegrityError(f"{directory}: index holds {art.index.ntotal} items, ids {len(item_ids)}, "
                                    f"vectors {vectors.shape}")
    q_table = np.load(directory / Q_TABLE) if Q_TABLE in manifest.files else None
    config = _read_json(directory / CONFIG).get("config", {})
    vocab_dir = directory / VOCAB_DIR if (directory / VOCAB_DIR).is_dir() else None
    try:
        model = (load_model or _default_load_model)(directory / USER_TOWER_DIR)
    except Exception as exc:
        raise ReleaseIntegrityError(f"the user tower of release {manifest.release_id} "
                                    f"({directory / USER_TOWER_DIR}) failed to load: {exc}") from exc
    ranker = _load_ranker(directory, manifest, vectors) if RANKER_META in manifest.files else None
    return LoadedRelease(manifest.release_id, manifest, art.index, item_ids, vectors, q_table, config, vocab_dir,
                         model, index_meta=art.metadata(), ranker=ranker)


def _load_ranker_only(directory: Path, manifest: ReleaseManifest, load_model: Callable[[Path], Any] | None,
                      base_dir: str | Path | None) -> LoadedRelease:
    bid = manifest.base["release_id"]
    base_dir = Path(base_dir) if base_dir is not None else directory.parent / bid
    if not (base_dir / MANIFEST).is_file():
        raise ReleaseIntegrityError(f"ranker-only release {manifest.release_id}: its base release {bid} is not at "
                                    f"{base_dir}")
    base = load_release_dir(base_dir, load_model, expected_release_id=bid,
                            expected_manifest_sha256=manifest.base["manifest_sha256"])
    if base.manifest.base is not None:
        raise ReleaseIntegrityError(f"release {bid} is ranker-only: it cannot be a base")
    bound = _read_json(directory / RANKER_META).get("item_table", {}).get("embeddings_sha256")
    if bound != _read_json(base_dir / EMB_META).get("content_sha256"):
        raise ReleaseIntegrityError(f"{directory / RANKER_META}: the ranker is bound to other item embeddings than "
                                    f"its base {bid}'s")
    return replace(base, release_id=manifest.release_id, manifest=manifest,
                   ranker=_load_ranker(directory, manifest, base.item_vectors))


def _load_ranker(directory: Path, manifest: ReleaseManifest, vectors: np.ndarray) -> Ranker:
    from towerflow.models.ranker import RankerFileError, load_ranker

    try:
        return load_ranker(directory / RANKER_DIR, ranker_item_table(vectors), release_id=manifest.release_id)
    except (RankerFileError, OSError, ValueError, RuntimeError) as exc:
        raise ReleaseIntegrityError(f"the ranker of release {manifest.release_id} ({directory / RANKER_DIR}) is "
                                    f"refused: {exc}") from exc


def cache_dir(settings: Settings) -> Path:
    """Verified local copies of registered releases, one directory per release id."""
    return settings.data_root / "release_cache"


def fetch_release(settings: Settings, version: int | str, client: MlflowClient | None = None) -> ReleaseManifest:
    """Make a verified local copy of the release held by registered model ``version``; return its manifest.

    A cached copy is re-verified; one that fails (a crash mid-copy, a disk error) is dropped and downloaded
    again. A download is verified before it is renamed into the cache, so the cache only holds whole releases.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from towerflow.infra.tracking import tracking_client

    client = client or tracking_client(settings)
    name = settings.registered_model
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ReleaseNotFoundError(f"registered model {name!r} has no version {version}") from exc
    rid = mv.tags.get(TAG_RELEASE_ID)
    if not rid:
        raise ReleaseIntegrityError(f"version {version} of {name!r} has no {TAG_RELEASE_ID} tag: not a release")
    expected_sha = mv.tags.get(TAG_MANIFEST_SHA)
    root = cache_dir(settings)
    final = root / check_release_id(rid)
    if final.is_dir():
        try:
            return verify_release(final, expected_release_id=rid, expected_manifest_sha256=expected_sha)
        except ReleaseIntegrityError:
            shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".dl-{rid}-", dir=root))
    try:
        source = client.get_model_version_download_uri(name, str(version))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                             tracking_uri=settings.tracking_uri))
        except (MlflowException, OSError) as exc:
            raise ReleaseIntegrityError(f"artifacts of release {rid} (version {version}) could not be "
                                        f"downloaded from {source}: {exc}") from exc
        manifest = verify_release(local, expected_release_id=rid, expected_manifest_sha256=expected_sha)
        try:
            os.rename(local, final)
        except OSError:
            if not final.is_dir():  # not "another loader got there first"
                raise
            return verify_release(final, expected_release_id=rid, expected_manifest_sha256=expected_sha)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return replace(manifest, path=final)


def fetch_base(settings: Settings, manifest: ReleaseManifest, client: MlflowClient | None = None) -> ReleaseManifest:
    """The verified local copy of a ranker-only release's base (its registered version, pinned by sha256)."""
    base = manifest.base
    got = fetch_release(settings, base["version"], client)
    if got.release_id != base["release_id"] or got.sha256 != base["manifest_sha256"]:
        raise ReleaseIntegrityError(f"ranker-only release {manifest.release_id}: version {base['version']} holds "
                                    f"release {got.release_id}, not its base {base['release_id']} as pinned")
    return got


def resolve_alias(settings: Settings, alias: str = CHAMPION, client: MlflowClient | None = None) -> int:
    """The registered model version an alias points at, read once."""
    from mlflow.exceptions import MlflowException

    from towerflow.infra.tracking import tracking_client

    client = client or tracking_client(settings)
    try:
        return int(client.get_model_version_by_alias(settings.registered_model, alias).version)
    except MlflowException as exc:
        raise ReleaseNotFoundError(f"no release has alias {alias!r} in registered model "
                                   f"{settings.registered_model!r} (promote one: towerflow release promote ID)"
                                   ) from exc


def load_release(
    settings: Settings,
    alias: str = CHAMPION,
    load_model: Callable[[Path], Any] | None = None,
) -> LoadedRelease:
    """Load the release an alias points at, the way serving does: resolve the alias ONCE to a version (so a
    concurrent promotion yields the old release or the new one, never parts of both), fetch and verify every
    artifact, and load index, ids, vectors, q table, config, user tower and ranker."""
    from towerflow.infra.tracking import tracking_client

    client = tracking_client(settings)
    version = resolve_alias(settings, alias, client)
    return replace(load_release_version(settings, version, load_model, client), alias=alias)


def load_release_version(settings: Settings, version: int, load_model: Callable[[Path], Any] | None = None,
                         client: MlflowClient | None = None) -> LoadedRelease:
    """Fetch, verify and load registered ``version`` (and, for a ranker-only release, its base)."""
    manifest = fetch_release(settings, version, client)
    base_dir = fetch_base(settings, manifest, client).path if manifest.base else None
    return replace(load_release_dir(manifest.path, load_model, manifest=manifest, base_dir=base_dir), version=version)
