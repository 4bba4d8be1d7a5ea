"""The ranker inside a release: written with its sidecar, verified, loaded over the release's own item table, refused
when it comes from another release, and flipped with the retriever by promotion and rollback.

Release k has items 1000k + i embedded by a real nn.Embedding seeded k, and a ranker built over that release's item
table (seeded k): a loader that mixed two releases would hand back item vectors or ranker weights of the other one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from towerflow.config import IndexConfig, RankerConfig, Settings
from towerflow.infra.promote import promote, register_release, rollback
from towerflow.infra.releases import (
    ReleaseIntegrityError,
    file_sha256,
    load_release,
    load_release_dir,
    new_release_id,
    ranker_item_table,
    verify_release,
    write_ranker_release,
    write_release,
)
from towerflow.infra.tracking import ensure_store, tracking_client
from towerflow.models.ranker import Ranker, RankerBatch
from towerflow.tasks.build_index import build_index
from towerflow.tasks.embed_items import embed_items

N_ITEMS, DIM = 30, 6
SMALL = RankerConfig(max_seq_len=4, latest_k=2, action_dim=2, item_dim=3, mlp_hidden=(8,), dropout=0.0)


def no_tower(path: Path) -> str:
    return f"tower at {path.name}"


def make_release(root: Path, work: Path, k: int, with_ranker: bool = True) -> Path:
    rid = new_release_id()
    torch.manual_seed(k)
    table = nn.Embedding(N_ITEMS + 1, DIM)
    emb = embed_items(lambda idx: table(idx), np.arange(1, N_ITEMS + 1), 1000 * k + np.arange(N_ITEMS), rid,
                      model_version=f"model-{k}")
    tower = work / f"tower-{k}-{rid}"
    tower.mkdir(parents=True)
    (tower / "weights.bin").write_bytes(bytes([k]))
    torch.manual_seed(100 + k)
    ranker = Ranker(torch.from_numpy(ranker_item_table(emb.vectors)), SMALL) if with_ranker else None
    write_release(root, release_id=rid, user_tower_dir=tower, embeddings=emb, index=build_index(emb, IndexConfig()),
                  config={"k": k}, snapshot_id=f"snap-{k}", ranker=ranker, ranker_metrics={"auc/mean": 0.5 + k / 100})
    return root / rid


def batch() -> RankerBatch:
    return RankerBatch(cand_items=torch.tensor([1, 5, 30]), surface=torch.zeros(3, dtype=torch.long),
                       hist_items=torch.tensor([[0, 2, 3, 4]] * 3), hist_actions=torch.tensor([[0, 1, 2, 1]] * 3),
                       hist_age_s=torch.tensor([[0.0, 30.0, 20.0, 10.0]] * 3))


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[int, Path]:
    root, work = tmp_path_factory.mktemp("releases"), tmp_path_factory.mktemp("work")
    return {k: make_release(root, work, k) for k in (1, 2)}


def rewrite_checksums(path: Path) -> None:
    m = json.loads((path / "release.json").read_text())
    m["files"] = {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*"))
                  if p.is_file() and p.relative_to(path).as_posix() != "release.json"}
    (path / "release.json").write_text(json.dumps(m))


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for key, value in changes.items():
        target = d
        *parents, leaf = key.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(json.dumps(d))


def test_a_release_with_a_ranker_round_trips(releases):
    path = releases[1]
    m = verify_release(path)
    assert {"ranker.json", "ranker/ranker.json", "ranker/ranker.pt"} <= set(m.files)
    sidecar = json.loads((path / "ranker.json").read_text())
    assert (sidecar["release_id"], sidecar["model_version"]) == (path.name, "model-1")
    assert sidecar["item_table"]["shape"] == [N_ITEMS + 1, DIM] and sidecar["metrics"] == {"auc/mean": 0.51}
    loaded = load_release_dir(path, no_tower)
    # the ranker sees the release's vectors one row down (row 0 = padding) and scores as the one written
    np.testing.assert_array_equal(loaded.ranker.item_vectors[1:].numpy(), np.asarray(loaded.item_vectors))
    assert not loaded.ranker.item_vectors[0].any()
    torch.manual_seed(101)
    twin = Ranker(torch.from_numpy(ranker_item_table(loaded.item_vectors)), SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.ranker(batch()), twin(batch()))
    # FAISS ids -> ranker rows: item 1000 + i is row i + 1; an id the release does not hold is row 0
    assert loaded.ranker_rows(np.array([1000, 1029, 1005, 2000, -1])).tolist() == [1, 30, 6, 0, 0]


def test_a_release_without_a_ranker_loads_with_none(tmp_path):
    path = make_release(tmp_path / "r", tmp_path / "w", 3, with_ranker=False)
    assert not any("ranker" in f for f in verify_release(path).files)
    assert load_release_dir(path, no_tower).ranker is None


def test_write_release_refuses_a_ranker_of_other_item_vectors(tmp_path, releases):
    from towerflow.tasks.build_index import IndexArtifact
    from towerflow.tasks.embed_items import ItemEmbeddings

    other = load_release_dir(releases[2], no_tower).ranker
    emb = ItemEmbeddings.load(releases[1])
    with pytest.raises(ReleaseIntegrityError, match="not release .* item embeddings"):
        write_release(tmp_path, release_id=emb.release_id, user_tower_dir=releases[1] / "user_tower",
                      embeddings=emb, index=IndexArtifact.load(releases[1]), config={}, snapshot_id="s", ranker=other)
    assert not any(tmp_path.iterdir())


def transplant(path: Path, donor: Path) -> None:
    """Copy ``donor``'s ranker into release directory ``path``, rewriting every id and hash to agree with ``path``."""
    shutil.rmtree(path / "ranker")
    shutil.copytree(donor / "ranker", path / "ranker")
    own = json.loads((path / "ranker.json").read_text())
    shutil.copy2(donor / "ranker.json", path / "ranker.json")
    edit_json(path / "ranker.json", release_id=path.name, model_version=own["model_version"],
              item_table=own["item_table"])
    edit_json(path / "ranker" / "ranker.json", release_id=path.name, item_table__sha256=own["item_table"]["sha256"])
    rewrite_checksums(path)


def test_a_ranker_copied_from_another_release_is_refused(tmp_path, releases):
    one, two = releases[1], releases[2]
    path = tmp_path / one.name
    shutil.copytree(one, path)
    shutil.rmtree(path / "ranker")
    shutil.copytree(two / "ranker", path / "ranker")
    shutil.copy2(two / "ranker.json", path / "ranker.json")
    with pytest.raises(ReleaseIntegrityError, match=r"ranker(/ranker\.pt|/ranker\.json|\.json) does not match"):
        verify_release(path)
    rewrite_checksums(path)
    with pytest.raises(ReleaseIntegrityError, match=rf"ranker\.json belongs to release {two.name}"):
        verify_release(path)
    edit_json(path / "ranker.json", release_id=one.name, model_version="model-1")
    rewrite_checksums(path)
    with pytest.raises(ReleaseIntegrityError, match=rf"a ranker of release {two.name}, not of release {one.name}"):
        verify_release(path)
    edit_json(path / "ranker" / "ranker.json", release_id=one.name)
    rewrite_checksums(path)
    with pytest.raises(ReleaseIntegrityError, match="bound to other item embeddings"):
        verify_release(path)
    edit_json(path / "ranker.json", item_table=json.loads((one / "ranker.json").read_text())["item_table"])
    rewrite_checksums(path)
    with pytest.raises(ReleaseIntegrityError, match="name different item tables"):
        verify_release(path)
    # a sidecar that lies about the table its ranker was saved over: load_ranker fingerprints the real table
    shutil.copy2(two / "ranker" / "ranker.json", path / "ranker" / "ranker.json")
    edit_json(path / "ranker.json", release_id=one.name, item_table=json.loads((two / "ranker.json").read_text())[
        "item_table"] | {"embeddings_sha256": json.loads((one / "item_embeddings.json").read_text())["content_sha256"]})
    edit_json(path / "ranker" / "ranker.json", release_id=one.name)
    rewrite_checksums(path)
    with pytest.raises(ReleaseIntegrityError, match="ranker of release .* is refused: .*not the table the ranker "
                                                    "was trained on"):
        load_release_dir(path, no_tower)
    # with every id and hash rewritten to agree, only the registry's pin on release.json can tell (next test)
    shutil.rmtree(path)
    shutil.copytree(one, path)
    transplant(path, two)
    verify_release(path)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one runs migrations, seconds); each test has its own model name."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    ensure_store(Settings(mlflow_tracking_uri=uri))
    return uri


@pytest.fixture
def settings(tmp_path, store_uri, request) -> Settings:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)
    return Settings(data_root=tmp_path / "root", mlflow_tracking_uri=store_uri, registered_model=name)


def test_promotion_and_rollback_flip_retriever_and_ranker_together(settings, releases):
    v1, v2 = (register_release(releases[k], None, settings) for k in (1, 2))
    promote(v1, settings)
    promote(v2, settings)
    now = load_release(settings, load_model=no_tower)
    assert now.release_id == releases[2].name and now.ranker_rows(np.array([2003])).tolist() == [4]
    rollback(settings)
    back = load_release(settings, load_model=no_tower)
    assert back.release_id == releases[1].name and back.ranker_rows(np.array([1003, 2003])).tolist() == [4, 0]
    expected = load_release_dir(releases[1], no_tower).ranker
    with torch.no_grad():
        torch.testing.assert_close(back.ranker(batch()), expected(batch()))
    np.testing.assert_array_equal(back.ranker.item_vectors[1:].numpy(), np.asarray(back.item_vectors))

    # the registry pins release.json: a stored copy given release 2's ranker, every id and hash rewritten to
    # agree, is refused
    client = tracking_client(settings)
    mv = client.get_model_version(settings.registered_model, str(v1))
    stored = Path(client.get_run(mv.run_id).info.artifact_uri.removeprefix("file://")) / "releases" / releases[1].name
    shutil.rmtree(Path(back.path))  # drop the verified cache copy so the loader fetches the stored one
    transplant(stored, releases[2])
    with pytest.raises(ReleaseIntegrityError, match=r"release\.json does not match the sha256 the registry"):
        load_release(settings, load_model=no_tower)


def ranker_only(releases: dict[int, Path], k: int, seed: int, base_version: int = 1) -> Path:
    """A ranker-only release over release k (a new ranker, seeded ``seed``, over k's item table)."""
    base = verify_release(releases[k])
    vectors = np.load(releases[k] / "item_embeddings.npy")
    torch.manual_seed(seed)
    ranker = Ranker(torch.from_numpy(ranker_item_table(vectors)), SMALL)
    m = write_ranker_release(releases[k].parent, release_id=new_release_id(), base=base, base_version=base_version,
                             ranker=ranker, config={"ranker": seed}, snapshot_id=f"snap-r{seed}",
                             model_version=f"ranker-{seed}", ranker_metrics={"auc/mean": 0.6})
    return m.path


def test_a_ranker_only_release_serves_its_bases_files_by_reference(releases, tmp_path):
    path = ranker_only(releases, 1, seed=7)
    assert sorted(verify_release(path).files) == ["config.json", "ranker.json", "ranker/ranker.json",
                                                  "ranker/ranker.pt"]  # no copy of the retriever
    manifest = json.loads((path / "release.json").read_text())
    assert manifest["base_release"] == {"release_id": releases[1].name, "version": 1,
                                        "manifest_sha256": verify_release(releases[1]).sha256}
    loaded, base = load_release_dir(path, no_tower), load_release_dir(releases[1], no_tower)
    assert loaded.release_id == path.name and loaded.path == path
    assert loaded.model == base.model and loaded.item_ids.tolist() == base.item_ids.tolist()
    assert loaded.vocab_dir == releases[1] / "vocab" or loaded.vocab_dir == base.vocab_dir
    torch.manual_seed(7)
    twin = Ranker(torch.from_numpy(ranker_item_table(base.item_vectors)), SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.ranker(batch()), twin(batch()))
        assert not torch.allclose(loaded.ranker(batch()), base.ranker(batch()))

    # a ranker over another release's table is refused at write time; a base that changed, at load time
    other = load_release_dir(releases[2], no_tower).ranker
    with pytest.raises(ReleaseIntegrityError, match="not release .* item embeddings"):
        write_ranker_release(tmp_path, release_id=new_release_id(), base=verify_release(releases[1]),
                             base_version=1, ranker=other, config={}, snapshot_id="s", model_version="m")
    moved = tmp_path / "moved"
    shutil.copytree(path, moved / path.name)
    with pytest.raises(ReleaseIntegrityError, match=f"its base release {releases[1].name} is not at"):
        load_release_dir(moved / path.name, no_tower)
    shutil.copytree(releases[1], moved / releases[1].name)
    edit_json(moved / releases[1].name / "release.json", snapshot_id="rewritten")
    with pytest.raises(ReleaseIntegrityError, match=r"release\.json does not match the sha256"):
        load_release_dir(moved / path.name, no_tower)
    with pytest.raises(ReleaseIntegrityError, match="is itself ranker-only"):
        write_ranker_release(tmp_path, release_id=new_release_id(), base=verify_release(path), base_version=1,
                             ranker=loaded.ranker, config={}, snapshot_id="s", model_version="m")


def test_ranker_only_promotion_rollback_and_gc_keep_the_base(settings, releases):
    from towerflow.infra.release_gc import gc_releases

    v1 = register_release(releases[1], None, settings)
    path = ranker_only(releases, 1, seed=8, base_version=v1)
    vr = register_release(path, None, settings)
    promote(vr, settings)
    # nothing but the ranker-only champion points at release 1: gc keeps it as its base
    assert gc_releases(settings, keep=1, min_age_hours=0, dry_run=True).kept[releases[1].name] == (
        f"base of ranker-only release {path.name}")
    shutil.rmtree(settings.data_root / "release_cache", ignore_errors=True)  # load fetches both from the registry
    served = load_release(settings, load_model=no_tower)
    assert (served.release_id, served.version) == (path.name, vr)
    assert served.item_ids.tolist() == (1000 + np.arange(N_ITEMS)).tolist()
    assert served.ranker_rows(np.array([1003])).tolist() == [4]
    promote(v1, settings)
    assert load_release(settings, load_model=no_tower).release_id == releases[1].name
    rollback(settings)  # back to the ranker-only release: its ranker over its base's retriever
    back = load_release(settings, load_model=no_tower)
    assert back.release_id == path.name and back.manifest.base["release_id"] == releases[1].name
    with torch.no_grad():
        torch.testing.assert_close(back.ranker(batch()), served.ranker(batch()))
