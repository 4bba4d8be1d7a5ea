"""Live items on a real release: POST /items embeds a new item with the champion's item tower from its features, the
next /retrieve can return it, GET /release counts it, it lands in the source's items table once, a hot swap
re-embeds it with the new tower, and adds may run while /retrieve serves.

The service has its own copy of the world's source (POST /items writes its items table), so the session's shared
world stays as the other serving tests expect it.
"""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from tests.serving.conftest import HORIZON
from towerflow.data.source import ParquetSink, ParquetSource
from towerflow.serving.realtime.store import SQLiteActionStore
from towerflow.serving.retrieval import search

NEW = 100_000  # item ids past the world's catalog (1..220)


@pytest.fixture(scope="module")
def live(served, tmp_path_factory):
    """(service, its TestClient, the source copy) with an action store of its own."""
    from fastapi.testclient import TestClient

    from towerflow.serving.app import create_app
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    root = tmp_path_factory.mktemp("live-items")
    shutil.copytree(served.settings.source, root / "source")
    source = ParquetSource(str(root / "source"))
    svc = RetrievalService(served.settings, ServingConfig(compact_interval_s=None, max_k=400), source=source,
                           realtime=SQLiteActionStore(root / "realtime.sqlite")).start(watch=False)
    with TestClient(create_app(service=svc)) as client:
        yield svc, client, source


def template(source: ParquetSource, item_id: int, new_id: int, **kw) -> dict:
    """The source's row of ``item_id`` as a POST /items payload under ``new_id``."""
    row = source.read_items().set_index("item_id").loc[item_id]
    return {"item_id": new_id, "category": row["category"], "genres": row["genres"], "title": f"new {new_id}",
            "created_ts": (HORIZON + timedelta(hours=1)).isoformat(),
            "features": [float(x) for x in row["features"]], **kw}


def tower_vector(bundle, payload: dict) -> np.ndarray:
    """The item tower's vector for the payload's features, worked out here: codes from the release's vocabulary,
    no id embedding, the title + category tokens (models/query.py)."""
    from towerflow.models.query import encode_texts

    vocab, tower = bundle.vocab, bundle.release.model.item_tower
    genres = [vocab.genres.index(g) + 1 for g in payload["genres"].split("|")]
    genres += [0] * (tower.genres.shape[1] - len(genres))
    text = torch.from_numpy(encode_texts([f"{payload['title']} {payload['category']}"]))
    with torch.inference_mode():
        v = tower.embed_features(torch.tensor([vocab.categories.index(payload["category"]) + 1]),
                                 torch.tensor([genres]), torch.tensor([payload["features"]], dtype=torch.float32),
                                 text=text)
    return v[0].numpy()


def rows_of(source: ParquetSource, item_id: int) -> int:
    return int((source.read_items()["item_id"] == item_id).sum())


def test_a_posted_item_is_embedded_retrievable_counted_and_written_once(live, served):
    svc, client, source = live
    b = svc.bundle
    n_before = len(source.read_items())
    payload = template(source, 3, NEW + 1)
    r = client.post("/items", json={"items": [payload]})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0, "live_items": 1, "release": b.release_id}
    assert client.get("/release").json()["live_items"] == 1

    index = svc.items.index(b.release_id)
    assert index.item_ids.tolist() == [NEW + 1]
    np.testing.assert_allclose(index.vectors[0], tower_vector(b, payload), atol=1e-6)
    # a query equal to its vector finds it first (cosine 1), beside the release's own items
    (hit,) = search(b.release, index.vectors[:1], 3, live=index)
    assert hit["items"][0]["item_id"] == NEW + 1 and hit["items"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(hit["items"]) == 3
    # /retrieve searches it: a k that spans the whole catalog returns every release item and it
    user = int(source.read_users()["user_id"].iloc[0])
    got = client.post("/retrieve", json={"user_id": user, "k": 400, "exclude_seen": False}).json()
    ids = [x["item_id"] for x in got["items"]]
    assert NEW + 1 in ids and len(ids) == len(b.release.item_ids) + 1
    assert ids.index(NEW + 1) < len(ids)

    # in the source's items table once, for the next retrain; re-posting it is a duplicate, not a second row
    assert rows_of(source, NEW + 1) == 1 and len(source.read_items()) == n_before + 1
    again = client.post("/items", json={"items": [payload]}).json()
    assert (again["accepted"], again["duplicates"], again["live_items"]) == (0, 1, 1)
    assert rows_of(source, NEW + 1) == 1
    stored = source.read_items().set_index("item_id").loc[NEW + 1]
    assert stored["category"] == payload["category"] and stored["features"].tolist() == pytest.approx(
        payload["features"])


def test_a_live_item_is_a_viewed_item_with_its_tower_vector(live, served):
    """A user viewing a brand-new item gets related answers: the context vector is the item's live vector (the
    vector its features embed to), for a known user (stored h + that context) and an unknown one (its neighbours)."""
    from towerflow.tasks.history import SURFACE_INDEX

    svc, client, source = live
    b = svc.bundle
    payload = template(source, 9, NEW + 20)
    client.post("/items", json={"items": [payload]}).raise_for_status()
    index, vec = svc.items.index(b.release_id), tower_vector(b, payload)  # vec (d,)
    user = int(source.read_users()["user_id"].iloc[3])
    ask = {"user_id": user, "k": 10, "exclude_seen": False, "context": {"surface": "related", "item_id": NEW + 20}}
    r = client.post("/retrieve", json=ask)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["path"] == "state"
    # by hand: the user's stored h combined with the item's tower vector, searched beside the live items,
    # the viewed item itself left out
    h = torch.tensor(svc.store.get([user], b.release_id)[user].h[None])  # (1, history_dim)
    with torch.inference_mode():
        u = b.release.model.user_tower.combine(h, torch.tensor([1]), torch.tensor([SURFACE_INDEX["related"]]),
                                               torch.from_numpy(b.profiles.of(np.array([user]))),
                                               torch.from_numpy(vec[None])).numpy()
    (want,) = search(b.release, u, 10, [np.array([NEW + 20])], live=index)
    assert [x["item_id"] for x in got["items"]] == [x["item_id"] for x in want["items"]]
    assert [x["score"] for x in got["items"]] == pytest.approx([x["score"] for x in want["items"]], abs=1e-5)
    # the viewed item moves the answer (it is not the no-context one)
    plain = client.post("/retrieve", json={**ask, "context": {"surface": "related"}}).json()
    assert [x["item_id"] for x in plain["items"]] != [x["item_id"] for x in got["items"]]

    # an unknown user: the live item's neighbours (its own vector searched, itself left out)
    cold = client.post("/retrieve", json={**ask, "user_id": 10**9}).json()
    (near,) = search(b.release, vec[None], 10, [np.array([NEW + 20])], live=index)
    assert cold["path"] == "context" and cold["items"] == near["items"]
    # an item neither in the catalog nor live is still refused
    r = client.post("/retrieve", json={**ask, "context": {"surface": "related", "item_id": NEW + 21}})
    assert r.status_code == 422 and "nor one of its" in r.json()["detail"]


def test_bad_items_are_refused_whole_with_the_row_named(live):
    svc, client, source = live
    n_table, n_live = len(source.read_items()), svc.items.count(svc.bundle.release_id)
    good = template(source, 4, NEW + 2)
    r = client.post("/items", json={"items": [good, {**good, "item_id": NEW + 3, "features": [1.0, 2.0]}]})
    assert r.status_code == 422
    assert r.json()["row"] == 1 and r.json()["detail"].startswith("items[1].features: [1.0, 2.0] is not a list of")
    r = client.post("/items", json={"items": [{**good, "item_id": -1}]})
    assert r.status_code == 422 and r.json()["row"] == 0 and "items[0].item_id: -1" in r.json()["detail"]
    # an id the table holds as another item: 409, row named, nothing changed
    r = client.post("/items", json={"items": [good, template(source, 5, 5, category="topic_99")]})
    assert r.status_code == 409 and r.json()["row"] == 1 and "items[1].item_id: 5" in r.json()["detail"]
    assert len(source.read_items()) == n_table and svc.items.count(svc.bundle.release_id) == n_live
    assert rows_of(source, NEW + 2) == 0


def test_events_may_name_a_posted_item_at_once_and_it_is_then_excluded_as_seen(live, served):
    svc, client, source = live
    client.post("/items", json={"items": [template(source, 6, NEW + 4)]}).raise_for_status()
    user = int(source.read_users()["user_id"].iloc[1])
    ev = {"event_id": f"live-item-{user}", "user_id": user, "item_id": NEW + 4, "action": "click",
          "ts": (HORIZON + timedelta(hours=2)).isoformat(), "surface": "homefeed"}
    r = client.post("/events", json={"events": [ev]})
    assert r.status_code == 200, r.text
    got = client.post("/retrieve", json={"user_id": user, "k": 400}).json()
    assert NEW + 4 not in [x["item_id"] for x in got["items"]]


def test_rows_added_to_the_source_table_become_live_once_created(live):
    svc, client, source = live
    table = source.read_items()
    past, future = template(source, 7, NEW + 5), template(source, 8, NEW + 6)
    rows = pd.DataFrame([past, future]).assign(
        created_ts=pd.to_datetime([HORIZON, pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=1)], utc=True),
        features=lambda d: d["features"].map(lambda f: np.asarray(f, dtype=np.float32)))
    ParquetSink(source.uri).write_items(pd.concat([table, rows], ignore_index=True))  # as an import would
    n = svc.items.count(svc.bundle.release_id)
    svc.reload_events()
    index = svc.items.index(svc.bundle.release_id)
    assert len(index) == n + 1 and NEW + 5 in index.item_ids and NEW + 6 not in index.item_ids


def test_a_hot_swap_re_embeds_live_items_with_the_new_tower(live, served):
    from towerflow.infra.promote import promote, rollback

    svc, client, source = live
    champ = svc.bundle
    held = sorted(svc.items.index(champ.release_id).item_ids.tolist())
    assert NEW + 1 in held
    payload = template(source, 3, NEW + 1)
    try:
        promote(int(served.other.model_version), served.settings)
        assert svc.poll() == served.other.release_id
        new = svc.bundle
        index = svc.items.index(new.release_id)
        assert sorted(index.item_ids.tolist()) == held
        assert client.get("/release").json()["live_items"] == len(held)
        row = index.item_ids.tolist().index(NEW + 1)
        np.testing.assert_allclose(index.vectors[row], tower_vector(new, payload), atol=1e-6)
        assert not np.allclose(index.vectors[row], tower_vector(champ, payload), atol=1e-3)  # another tower
    finally:
        rollback(served.settings)
    assert svc.poll() == champ.release_id and svc.items.count(champ.release_id) == len(held)


def test_adds_and_retrieves_run_concurrently(live):
    svc, client, source = live
    users = source.read_users()["user_id"].head(20).tolist()
    base = svc.items.count(svc.bundle.release_id)
    errors: list[BaseException] = []
    stop = threading.Event()

    def ask() -> None:
        i = 0
        while not stop.is_set():
            try:
                out = svc.retrieve(int(users[i % len(users)]), k=10)
                assert len(out["items"]) == 10
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for j in range(12):
            svc.add_items([template(source, 10 + j, NEW + 100 + j)])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:1]
    assert svc.items.count(svc.bundle.release_id) == base + 12
    assert len(source.read_items().query(f"item_id >= {NEW + 100}")) == 12


class InProcess:
    """The replay's client, answered by the service in this process (what the HTTP routes call)."""

    def __init__(self, svc):
        self.svc, self.paths = svc, []

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        self.paths.append(path)
        if path == "/items":
            return 200, self.svc.add_items(body["items"])
        if path == "/events":
            return 200, self.svc.ingest(body["events"])
        return 200, self.svc.retrieve(body["user_id"], None, body["context"]["surface"], body["k"])


def test_the_replay_posts_a_new_item_before_the_first_event_after_its_creation(live):
    from towerflow.serving.realtime.replay import replay

    svc, client, source = live
    user = int(source.read_users()["user_id"].iloc[2])
    t = HORIZON + timedelta(hours=3)
    items = pd.DataFrame([template(source, 12, NEW + 50), template(source, 13, NEW + 51)]).assign(
        created_ts=[t, t + timedelta(seconds=5)])
    events = pd.DataFrame({"event_id": ["rp-1", "rp-2", "rp-3"], "user_id": [user] * 3,
                           "item_id": [1, NEW + 50, NEW + 51], "action": ["impression", "click", "click"],
                           "ts": [t - timedelta(seconds=1), t + timedelta(seconds=1), t + timedelta(seconds=6)],
                           "surface": ["homefeed"] * 3, "context_item_id": [None] * 3, "query": [None] * 3})
    c = InProcess(svc)
    out = replay(events, c, k=10, items=items)
    # the impression before the items' creation is sent first; each item before the first event after it
    assert c.paths == ["/events", "/items", "/retrieve", "/events", "/items", "/retrieve", "/events"]
    assert (out.items, out.created_engagements, out.engagements, out.events) == (2, 2, 2, 3)
    assert {NEW + 50, NEW + 51} <= set(svc.items.index(svc.bundle.release_id).item_ids.tolist())
    assert rows_of(source, NEW + 50) == rows_of(source, NEW + 51) == 1
    # without posting: the same engagements are counted, no item is sent
    c = InProcess(svc)
    out = replay(events.assign(event_id=["rq-1", "rq-2", "rq-3"]), c, k=10, items=items, post_items=False)
    assert "/items" not in c.paths and (out.items, out.created_engagements) == (0, 2)


def test_the_next_retrains_snapshot_folds_a_posted_item_into_its_catalog(live, tmp_path):
    from towerflow.tasks.extract import extract
    from towerflow.tasks.vocabulary import build_vocab

    svc, client, source = live
    assert rows_of(source, NEW + 1) == 1  # posted by the first test
    snap = extract(source, HORIZON + timedelta(days=1), 5, tmp_path / "snapshots")
    items = snap.items()
    assert int((items["item_id"] == NEW + 1).sum()) == 1
    assert NEW + 1 in build_vocab(snap.users(), items).item_ids  # the next release holds it: not live there
