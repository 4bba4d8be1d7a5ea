"""Releases end to end against a real MLflow SQLite store and real FAISS files.

One store per module (creating it runs migrations, seconds); each test registers into its own registered model
and uses its own data root (lock and release cache), so tests do not see each other's champions.
Releases are told apart by construction: release k has item ids 1000*k + i and a user tower whose weights all
equal k, so a loader that mixed two releases could not pass the checks in ``assert_whole``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from towerflow.cli import main
from towerflow.config import IndexConfig, Settings
from towerflow.infra.promote import (
    STEPS,
    InvalidReleaseRefError,
    PromotionConflictError,
    PromotionError,
    list_releases,
    promote,
    register_release,
    resolve_version,
    rollback,
    show_release,
)
from towerflow.infra.release_gc import gc_releases
from towerflow.infra.releases import (
    ReleaseIntegrityError,
    ReleaseNotFoundError,
    check_release_id,
    load_release,
    load_release_dir,
    new_release_id,
    verify_release,
    write_release,
)
from towerflow.infra.tracking import ensure_store, tracking_client
from towerflow.tasks.build_index import build_index
from towerflow.tasks.embed_items import embed_items

N_ITEMS, DIM = 40, 8


class TinyTower(nn.Module):
    """A real (tiny) user tower saved with torch.save, standing in for models.two_tower."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, DIM)


def save_tower(directory: Path, value: float) -> Path:
    directory.mkdir(parents=True)
    m = TinyTower()
    nn.init.constant_(m.proj.weight, value)
    torch.save(m.state_dict(), directory / "weights.pt")
    (directory / "config.json").write_text(json.dumps({"in": 4, "out": DIM}))
    return directory


def load_tower(directory: Path) -> TinyTower:
    m = TinyTower()
    m.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))
    return m


def make_release(releases_dir: Path, work: Path, k: int, rid: str | None = None,
                 index: IndexConfig | None = None) -> str:
    """Release k: items 1000k .. 1000k+39 embedded by a real nn.Embedding, a flat index (or ``index``'s), tower
    weights = k."""
    rid = rid or new_release_id()
    torch.manual_seed(k)
    table = nn.Embedding(N_ITEMS + 1, DIM)
    emb = embed_items(lambda idx: nn.functional.normalize(table(idx), dim=-1), np.arange(1, N_ITEMS + 1),
                      1000 * k + np.arange(N_ITEMS), rid, batch_size=16, model_version=f"model-{k}")
    vocab = work / f"vocab-{k}.json"
    vocab.write_text(json.dumps({"items": (1000 * k + np.arange(N_ITEMS)).tolist()}))
    write_release(releases_dir, release_id=rid, user_tower_dir=save_tower(work / f"tower-{k}", float(k)),
                  embeddings=emb, index=build_index(emb, index or IndexConfig()), config={"k": k},
                  snapshot_id=f"snap-{k}", metrics={"recall@10": 0.1 * k}, q_table=np.full(N_ITEMS + 1, 1 / N_ITEMS),
                  vocab=vocab)
    return rid


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    ensure_store(Settings(mlflow_tracking_uri=uri))
    return uri


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[int, Path]:
    """Three release directories, k = 1, 2, 3 (built once for the module)."""
    root, work = tmp_path_factory.mktemp("releases"), tmp_path_factory.mktemp("work")
    return {k: root / make_release(root, work, k) for k in (1, 2, 3)}


@pytest.fixture
def settings(tmp_path, store_uri, request) -> Settings:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)
    return Settings(data_root=tmp_path / "root", mlflow_tracking_uri=store_uri, registered_model=name)


def k_of(loaded) -> int:
    return int(loaded.manifest.snapshot_id.split("-")[1])


def assert_whole(loaded, k: int) -> None:
    """Every artifact the loader handed back belongs to release k."""
    assert k_of(loaded) == k and loaded.config == {"k": k}
    assert torch.all(loaded.model.proj.weight == float(k))
    assert loaded.item_ids.tolist() == (1000 * k + np.arange(N_ITEMS)).tolist()
    _, ids = loaded.search(np.asarray(loaded.item_vectors[:3]), 1)
    assert ids[:, 0].tolist() == [1000 * k, 1000 * k + 1, 1000 * k + 2]
    assert loaded.q_table.shape == (N_ITEMS + 1,)


def registered(settings: Settings, releases: dict[int, Path], *ks: int) -> dict[int, int]:
    return {k: register_release(releases[k], None, settings) for k in ks}


def test_release_ids_are_sortable_and_checked():
    rid = new_release_id()
    assert check_release_id(rid) == rid and len(rid) == len("r-20260101T000000-abcdef")
    for bad in ("r-2026-01-01-abcdef", "release", "r-20260101T000000-ABCDEF"):
        with pytest.raises(ReleaseIntegrityError, match="is not a release id"):
            check_release_id(bad)


def test_written_release_lists_every_file_and_loads_whole(releases):
    path = releases[2]
    manifest = verify_release(path)
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"release.json"}
    assert set(manifest.files) == on_disk
    assert {"user_tower/weights.pt", "index.faiss", "index.json", "item_embeddings.npy", "q_table.npy",
            "vocab/vocab-2.json", "config.json"} <= on_disk
    for sidecar in ("index.json", "item_embeddings.json", "user_tower.json", "q_table.json", "vocab.json",
                    "config.json"):
        assert json.loads((path / sidecar).read_text())["release_id"] == manifest.release_id == path.name
    assert manifest.metrics == {"recall@10": 0.2} and manifest.index["kind"] == "flat"
    assert_whole(load_release_dir(path, load_tower), 2)


def test_a_deep_search_of_a_loaded_ivf_release_probes_enough_lists(tmp_path):
    path = tmp_path / make_release(tmp_path, tmp_path, 4, index=IndexConfig(kind="ivfflat", ivf_nlist=4, nprobe=1))
    loaded = load_release_dir(path, load_tower)
    assert loaded.index_meta["kind"] == "ivfflat" and loaded.index_meta["params"]["nprobe"] == 1
    query = np.asarray(loaded.item_vectors[:1])
    _, raw = loaded.index.search(query, N_ITEMS)  # one of 4 non-empty lists: fewer than 40 items, -1 after them
    assert (raw < 0).any()
    # depth 40 probes min(4, ceil(2 * 40 * 4 lists / 40 items)) = 4 lists: the whole catalog, as exact search
    scores, ids = loaded.search(query, N_ITEMS)
    assert sorted(ids[0].tolist()) == (4000 + np.arange(N_ITEMS)).tolist() and ids[0, 0] == 4000
    exact = np.sort(np.asarray(loaded.item_vectors) @ query[0])[::-1]
    np.testing.assert_allclose(scores[0], exact, rtol=1e-5, atol=1e-6)
    assert loaded.search(query, 5)[1].tolist() == raw[:, :5].tolist()  # a shallow one: the index's own nprobe


@pytest.fixture
def copy_of(tmp_path, releases):
    def _copy(k: int) -> Path:
        dst = tmp_path / "copies" / releases[k].name
        shutil.copytree(releases[k], dst)
        return dst

    return _copy


def rewrite_checksums(path: Path) -> None:
    """What a careless hand-fix would do: make release.json agree with whatever files are there now."""
    m = json.loads((path / "release.json").read_text())
    from towerflow.infra.releases import file_sha256

    m["files"] = {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*"))
                  if p.is_file() and p.name != "release.json"}
    (path / "release.json").write_text(json.dumps(m))


def test_tampered_index_file_is_refused(copy_of):
    path = copy_of(1)
    raw = bytearray((path / "index.faiss").read_bytes())
    raw[-3] ^= 0x01
    (path / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(ReleaseIntegrityError, match=r"index\.faiss does not match its sha256"):
        load_release_dir(path, load_tower)


def test_sidecar_from_another_release_is_refused_even_with_rewritten_checksums(copy_of, releases):
    path = copy_of(1)
    for name in ("index.faiss", "index.json"):
        shutil.copy2(releases[2] / name, path / name)
    with pytest.raises(ReleaseIntegrityError, match=r"index\.(faiss|json) does not match its sha256"):
        verify_release(path)
    rewrite_checksums(path)
    with pytest.raises(ReleaseIntegrityError, match=rf"index\.json belongs to release {releases[2].name}"):
        load_release_dir(path, load_tower)


def test_missing_and_unlisted_files_are_refused(copy_of):
    path = copy_of(1)
    (path / "q_table.npy").unlink()
    with pytest.raises(ReleaseIntegrityError, match=r"is missing q_table\.npy"):
        verify_release(path)
    path = copy_of(2)
    (path / "user_tower" / "extra.pt").write_bytes(b"x")
    with pytest.raises(ReleaseIntegrityError, match=r"user_tower/extra\.pt .* not listed"):
        verify_release(path)


def test_write_release_refuses_an_index_of_other_embeddings(tmp_path, releases):
    from towerflow.tasks.build_index import IndexArtifact
    from towerflow.tasks.embed_items import ItemEmbeddings

    emb1 = ItemEmbeddings.load(releases[1])
    index2 = IndexArtifact.load(releases[2])
    with pytest.raises(ReleaseIntegrityError, match=rf"the index belong to release {releases[2].name}"):
        write_release(tmp_path, release_id=emb1.release_id, user_tower_dir=releases[1] / "user_tower",
                      embeddings=emb1, index=index2, config={}, snapshot_id="s")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_register_promote_load_list_show(settings, releases):
    versions = registered(settings, releases, 1)
    assert register_release(releases[1], None, settings) == versions[1]  # idempotent
    with pytest.raises(ReleaseNotFoundError, match="no release has alias 'champion'"):
        load_release(settings, load_model=load_tower)
    result = promote(versions[1], settings)
    assert result.changed and result.previous_version is None
    loaded = load_release(settings, load_model=load_tower)
    assert_whole(loaded, 1)
    assert (loaded.version, loaded.alias) == (versions[1], "champion")
    [info] = list_releases(settings)
    assert (info.release_id, info.aliases, info.metrics) == (releases[1].name, ["champion"], {"recall@10": 0.1})
    shown = show_release(releases[1].name, settings)
    assert shown.checksums == verify_release(releases[1]).files
    assert not promote(versions[1], settings).changed  # promoting the champion again is a no-op


def test_tampered_registry_artifact_is_refused_by_the_loader(settings, releases):
    v = registered(settings, releases, 1)[1]
    promote(v, settings, verify=False)
    client = tracking_client(settings)
    mv = client.get_model_version(settings.registered_model, str(v))
    stored = Path(client.get_run(mv.run_id).info.artifact_uri.removeprefix("file://")) / "releases" / releases[1].name
    raw = bytearray((stored / "index.faiss").read_bytes())
    raw[-3] ^= 0x01
    (stored / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(ReleaseIntegrityError, match=r"index\.faiss does not match its sha256"):
        load_release(settings, load_model=load_tower)
    rewrite_checksums(stored)  # consistent manifest, but not the one the registry recorded
    with pytest.raises(ReleaseIntegrityError, match=r"release\.json does not match the sha256 the registry"):
        load_release(settings, load_model=load_tower)


def test_corrupted_cache_copy_is_fetched_again(settings, releases):
    v = registered(settings, releases, 3)[3]
    promote(v, settings)
    first = load_release(settings, load_model=load_tower)
    (first.path / "item_ids.npy").write_bytes(b"garbage")
    assert_whole(load_release(settings, load_model=load_tower), 3)


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_any_promotion_step_serves_one_whole_release(settings, releases, step):
    v1 = registered(settings, releases, 1)[1]
    promote(v1, settings)

    def crash_at(name: str) -> None:
        if name == step:
            raise Crash(name)

    with pytest.raises(Crash):
        v2 = register_release(releases[2], None, settings, on_step=crash_at)
        promote(v2, settings, on_step=crash_at)
    # Before the flip the old release is served whole; from the flip on, the new one.
    expected = 2 if step == "flipped" else 1
    assert_whole(load_release(settings, load_model=load_tower), expected)
    # Recovery: re-running the flow registers at most once more and promotes cleanly.
    v2 = register_release(releases[2], None, settings)
    assert promote(v2, settings).changed == (step != "flipped")
    assert_whole(load_release(settings, load_model=load_tower), 2)
    assert rollback(settings).version == v1
    assert_whole(load_release(settings, load_model=load_tower), 1)


def test_concurrent_promotions_one_wins_the_other_fails_clearly(settings, releases):
    v = registered(settings, releases, 1, 2, 3)
    promote(v[1], settings)
    inside, release_a = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def hold_before_flip(name: str) -> None:
        if name == "before_flip":
            inside.set()
            assert release_a.wait(30)

    def run_a() -> None:
        try:
            outcome["a"] = promote(v[2], settings, on_step=hold_before_flip)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome["a"] = exc

    a = threading.Thread(target=run_a)
    a.start()
    assert inside.wait(30)
    try:
        with pytest.raises(PromotionConflictError, match="another promotion of .* is in progress"):
            promote(v[3], settings)
    finally:
        release_a.set()
        a.join(30)
    assert outcome["a"].version == v[2] and outcome["a"].previous_version == v[1]
    assert_whole(load_release(settings, load_model=load_tower), 2)


def test_promoter_without_the_shared_lock_is_caught_by_compare_and_set(settings, releases, tmp_path):
    """A second machine (other data root, so another lock file) flips champion while we are mid-promotion."""
    v = registered(settings, releases, 1, 2, 3)
    promote(v[1], settings)
    elsewhere = settings.model_copy(update={"data_root": tmp_path / "other-machine"})

    def other_machine_promotes(name: str) -> None:
        if name == "before_flip":
            promote(v[3], elsewhere)

    with pytest.raises(PromotionConflictError, match="moved from version 1 to 3"):
        promote(v[2], settings, on_step=other_machine_promotes)
    assert_whole(load_release(settings, load_model=load_tower), 3)
    with pytest.raises(PromotionConflictError, match="not the expected 1"):
        promote(v[2], settings, expected_champion=v[1])


def test_a_retried_promotion_after_its_flip_succeeded_reports_already_champion(settings, releases):
    """A task retry (io_retries) re-runs promote(v2, expected_champion=v1) after the first attempt flipped."""
    v = registered(settings, releases, 1, 2)
    promote(v[1], settings)
    first = promote(v[2], settings, expected_champion=v[1])
    again = promote(v[2], settings, expected_champion=v[1])
    assert (first.version, first.previous_version, first.changed) == (v[2], v[1], True)
    assert (again.version, again.previous_version, again.changed) == (v[2], v[1], False)
    assert str(again).endswith("is already champion")
    assert_whole(load_release(settings, load_model=load_tower), 2)


def test_rollback_walks_back_the_recorded_chain(settings, releases):
    v = registered(settings, releases, 1, 2, 3)
    with pytest.raises(ReleaseNotFoundError, match="nothing to roll back"):
        rollback(settings)
    for k in (1, 2, 3):
        promote(v[k], settings)
    aliases = {r.version: r.aliases for r in list_releases(settings)}
    assert aliases == {v[3]: ["champion"], v[2]: ["previous"], v[1]: []}
    assert rollback(settings).version == v[2]
    assert_whole(load_release(settings, load_model=load_tower), 2)
    assert {r.version: r.aliases for r in list_releases(settings)}[v[1]] == ["previous"]
    assert rollback(settings).version == v[1]
    assert_whole(load_release(settings, load_model=load_tower), 1)
    with pytest.raises(PromotionError, match="no previous champion recorded"):
        rollback(settings)
    assert_whole(load_release(settings, load_model=load_tower), 1)


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Point the CLI's ``Settings()`` at ``settings``."""
    for key, value in (("DATA_ROOT", settings.data_root), ("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri),
                       ("REGISTERED_MODEL", settings.registered_model)):
        monkeypatch.setenv(f"TOWERFLOW_{key}", str(value))


def test_cli_list_show_promote_rollback(settings, releases, monkeypatch, capsys):
    use_settings(monkeypatch, settings)
    v1 = registered(settings, releases, 1)[1]
    shutil.copytree(releases[2], settings.releases_dir / releases[2].name)  # gated locally, not yet registered

    assert main(["release", "promote", str(v1)]) == 0
    assert main(["release", "promote", releases[2].name]) == 0
    out = capsys.readouterr().out
    assert f"registered {releases[2].name} as version 2" in out and "champion -> version 2" in out
    assert main(["release", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["release_id"], r["aliases"]) for r in listed] == [
        (2, releases[2].name, ["champion"]), (1, releases[1].name, ["previous"])]
    assert main(["release", "show", releases[2].name, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["checksums"] == verify_release(releases[2]).files and shown["metrics"] == {"recall@10": 0.2}
    assert main(["release", "rollback"]) == 0
    assert "champion -> version 1" in capsys.readouterr().out
    assert main(["release", "rollback"]) == 1
    assert "error: version 1" in capsys.readouterr().err
    assert main(["release", "list"]) == 0
    assert "champion" in capsys.readouterr().out


def test_an_empty_or_malformed_release_id_is_refused_not_resolved(settings, releases, monkeypatch, capsys):
    """``release promote ""`` used to drop the tag filter and promote the oldest version, exit 0."""
    use_settings(monkeypatch, settings)
    v = registered(settings, releases, 1, 2)
    promote(v[2], settings)
    for ref in ("", "   ", "\t"):
        with pytest.raises(InvalidReleaseRefError, match="the release id is empty"):
            promote(resolve_version(ref, settings), settings)
        assert main(["release", "promote", ref]) == 1
        assert capsys.readouterr().err.strip() == ("error: the release id is empty: give a release id "
                                                   "(r-YYYYmmddTHHMMSS-<6 hex>) or a registered version number")
        assert main(["release", "show", ref]) == 1
        assert "the release id is empty" in capsys.readouterr().err
    for ref, says in (("0", "version 0 does not exist"), ("r-1", "'r-1' is not a release id"),
                      ("v2", "'v2' is not a release id")):
        assert main(["release", "promote", ref]) == 1
        assert says in capsys.readouterr().err
    assert load_release(settings, load_model=load_tower).version == v[2]  # nothing moved
    assert resolve_version(" 1 ", settings) == 1 and resolve_version(releases[1].name, settings) == v[1]


def _rid(second: int) -> str:
    return f"r-20260101T0000{second:02d}-{second:06x}"


def test_gc_removes_only_what_nothing_references(settings, tmp_path, monkeypatch, capsys):
    """Releases r1..r7 (ids in creation order): r1..r6 registered, r7 only written (a retrain that failed after
    assembling it). r1 was champion once, r3 is the previous champion, r4 the champion, the ledger names r2; with
    keep 2 the newest two (r6, r7) stay, and r1 and r5 go from the registry, the artifact store, the release
    directories and the cache."""
    use_settings(monkeypatch, settings)
    from towerflow.backfill import Ledger, LedgerEntry
    from towerflow.infra.releases import cache_dir, fetch_release

    rel = {k: settings.releases_dir / make_release(settings.releases_dir, tmp_path, k, _rid(k)) for k in range(1, 8)}
    v = registered(settings, rel, 1, 2, 3, 4, 5, 6)
    for k in (1, 3, 4):
        promote(v[k], settings)
    fetch_release(settings, v[1])  # a cached copy of r1, as a server that once loaded it leaves
    Ledger(settings.data_root / "backfill" / "ledger.sqlite").record(LedgerEntry(
        day="2026-01-03", work="retrain", lookback_days=2, release_id=rel[2].name, finished_at="2026-01-03T04:00:00Z"))
    old_tmp, new_tmp = settings.releases_dir / ".tmp-crashed-abc", settings.releases_dir / ".tmp-in-progress-def"
    old_tmp.mkdir()
    new_tmp.mkdir()
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    client = tracking_client(settings)
    artifacts = {k: Path(client.get_run(client.get_model_version(settings.registered_model, str(v[k])).run_id)
                         .info.artifact_uri.removeprefix("file://")) / "releases" / rel[k].name for k in (1, 5)}
    assert all(p.is_dir() for p in artifacts.values())

    plan = gc_releases(settings, keep=2, dry_run=True)
    assert plan.kept == {rel[4].name: "alias champion", rel[3].name: "alias previous",
                         rel[2].name: "backfill ledger, 2026-01-03", rel[6].name: "one of the newest 2",
                         rel[7].name: "one of the newest 2"}
    assert plan.removed_versions == {v[1]: rel[1].name, v[5]: rel[5].name}
    gone = [rel[1], rel[5], cache_dir(settings) / rel[1].name, old_tmp]
    assert sorted(plan.removed_paths) == sorted(gone)
    assert all(p.exists() for p in gone) and len(list_releases(settings)) == 6  # a dry run removes nothing

    assert main(["release", "gc", "--keep", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"removed version {v[1]} (release {rel[1].name})" in out and f"removed {rel[5]}" in out
    assert f"kept {rel[4].name} (alias champion)" in out
    assert sorted(r.version for r in list_releases(settings)) == [v[2], v[3], v[4], v[6]]
    assert not any(p.exists() for p in gone) and not any(p.exists() for p in artifacts.values())
    assert new_tmp.is_dir() and all(rel[k].is_dir() for k in (2, 3, 4, 6, 7))
    assert_whole(load_release(settings, load_model=load_tower), 4)
    assert main(["release", "gc", "--keep", "2", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to remove"

    rollback(settings)  # the previous champion is whole; ITS predecessor (r1) is gone, so no `previous` now
    assert_whole(load_release(settings, load_model=load_tower), 3)
    assert gc_releases(settings, keep=2, dry_run=True).removed_versions == {v[4]: rel[4].name}  # rolled back from
    assert main(["release", "gc", "--keep", "0"]) == 1
    assert "--keep must be at least 1" in capsys.readouterr().err


def test_gc_keeps_a_running_retrains_release_that_a_backfill_pushed_out_of_the_newest(settings, tmp_path,
                                                                                        monkeypatch, capsys):
    """A daily retrain assembled r-...T000000 at 00:00 and is still gating it at 02:00; a backfill meanwhile wrote
    three newer releases. With keep 2 the retrain's is not among the newest, but it is 2 h old: kept (default
    24 h); with --min-age-hours 1 it goes. The week-old one goes either way."""
    use_settings(monkeypatch, settings)
    from datetime import UTC, datetime

    from towerflow.infra.release_gc import release_created

    now = datetime(2026, 3, 10, 2, 0, tzinfo=UTC).timestamp()
    ids = {"week_old": "r-20260303T020000-000001", "retrain": "r-20260310T000000-000002",
           **{f"backfill{k}": f"r-20260310T01{k}000-00000{k + 2}" for k in range(1, 4)}}
    rel = {name: settings.releases_dir / make_release(settings.releases_dir, tmp_path, k, rid)
           for k, (name, rid) in enumerate(ids.items(), 1)}
    assert now - release_created(ids["retrain"]) == 2 * 3600
    plan = gc_releases(settings, keep=2, dry_run=True, now=now)
    assert plan.kept == {ids["backfill3"]: "one of the newest 2", ids["backfill2"]: "one of the newest 2",
                         ids["backfill1"]: "younger than 24 h: a retrain may still promote it",
                         ids["retrain"]: "younger than 24 h: a retrain may still promote it"}
    assert plan.removed_paths == [rel["week_old"]]
    plan = gc_releases(settings, keep=2, min_age_hours=1, dry_run=True, now=now)
    assert sorted(plan.removed_paths) == [rel["week_old"], rel["retrain"]]
    assert gc_releases(settings, keep=2, min_age_hours=1, now=now).removed_paths == plan.removed_paths
    assert sorted(p.name for p in settings.releases_dir.iterdir()) == sorted(
        ids[k] for k in ("backfill1", "backfill2", "backfill3"))
    assert main(["release", "gc", "--min-age-hours", "-1"]) == 1
    assert "--min-age-hours must be >= 0 (got -1.0)" in capsys.readouterr().err


def test_cli_promote_waits_for_a_live_promotion_then_gives_up_naming_it(settings, releases, monkeypatch, capsys):
    from towerflow.infra.lease import lease
    from towerflow.infra.promote import lease_path

    use_settings(monkeypatch, settings)
    v = registered(settings, releases, 1, 2)
    promote(v[1], settings)
    with lease(lease_path(settings), note="a retrain's promotion"):
        assert main(["release", "promote", str(v[2]), "--wait-s", "0.5"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"waiting for {lease_path(settings)}: held by pid {os.getpid()} on ")
        assert err[-1].startswith(f"error: another promotion of '{settings.registered_model}' is in progress "
                                  "(gave up after waiting 0.") and "(a retrain's promotion) since" in err[-1]
        assert main(["release", "rollback"]) == 1  # no --wait-s: at once
        assert "is held by pid" in capsys.readouterr().err
    assert main(["release", "promote", str(v[2]), "--wait-s", "5"]) == 0  # released: no wait
    assert load_release(settings, load_model=load_tower).version == v[2]
