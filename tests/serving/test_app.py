"""The HTTP API on a real release: answers, the hybrid path against the full online path, cold users, bad
requests, and the version handshake (a state of another release is never paired with the served tower)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving.conftest import HORIZON, service_for
from towerflow.serving.state_store import InMemoryUserStateStore, SQLiteUserStateStore, UserState


@pytest.fixture(scope="module")
def online(served):
    svc = service_for(served, mode="online")
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def users(served) -> list[int]:
    """Users with a stored state, with at least 3 seen items."""
    store = SQLiteUserStateStore(served.settings.user_states_path)
    states = store.get(list(range(0, 1000)), served.champion.release_id)
    return [u for u, s in sorted(states.items()) if len(s.seen_items) >= 3][:8]


@pytest.fixture(scope="module")
def items(hybrid) -> list[int]:
    return [int(i) for i in hybrid.bundle.vocab.item_ids[[0, 7, 42, 99]]]


def test_healthz_and_release(client, served):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["release"] == served.champion.release_id
    info = client.get("/release").json()
    assert info["release"] == served.champion.release_id and info["version"] == 2
    assert info["n_items"] == len(client.app.state.service.bundle.vocab.item_ids)
    assert info["mode"] == "hybrid" and info["events_as_of"] == HORIZON.isoformat() and info["swaps"] == 0


def test_retrieve_uses_the_stored_state_and_names_its_release(client, served, users, items):
    store = SQLiteUserStateStore(served.settings.user_states_path)
    seen = set(store.get([users[0]], served.champion.release_id)[users[0]].seen_items.tolist())
    r = client.post("/retrieve", json={"user_id": users[0], "context": {"item_id": items[1], "surface": "related"},
                                       "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["release"] == served.champion.release_id and body["version"] == 2 and body["path"] == "state"
    ids, scores = [i["item_id"] for i in body["items"]], [i["score"] for i in body["items"]]
    assert len(ids) == len(set(ids)) == 7 and scores == sorted(scores, reverse=True)
    assert not set(ids) & seen and items[1] not in ids  # seen items and the viewed item itself are dropped


def test_hybrid_path_equals_the_full_online_path(hybrid, online, users, items):
    for u in users:
        for ctx, surface in ((None, "homefeed"), (items[0], "related"), (items[2], "search")):
            a, b = hybrid.retrieve(u, ctx, surface, k=10), online.retrieve(u, ctx, surface, k=10)
            assert (a["path"], b["path"]) == ("state", "online")
            assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
            np.testing.assert_allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]],
                                       rtol=0, atol=1e-5)


def test_a_search_query_joins_the_context_online_and_batched_answers_equal_alone(hybrid, online, users):
    from towerflow.serving.service import Query

    words = hybrid.bundle.release.model.cfg.use_query and "kalo venmi"
    assert words, "the retrain's default model takes the query"
    u = users[2]
    plain, typed = hybrid.retrieve(u, None, "search", k=10), hybrid.retrieve(u, None, "search", k=10, query=words)
    assert typed["path"] == "state" and typed["items"] != plain["items"]  # the query moved the user vector
    assert hybrid.retrieve(u, None, "search", k=10, query="") == plain  # an empty query is no query
    _same(online.retrieve(u, None, "search", k=10, query=words), typed)  # the query is online only
    # one batch mixing queries, no query and a bad query: each answer is the one it gets alone
    batch = [Query(u, None, "search", 10, True, words), Query(u, None, "search", 10, True, None),
             Query(u, None, "related", 10, True, words), Query(users[3], None, "search", 10, True, "other words")]
    out = hybrid.retrieve_batch(batch)
    _same(out[0], typed)
    _same(out[1], plain)
    assert "only allowed on the 'search' surface" in str(out[2])
    _same(out[3], hybrid.retrieve(users[3], None, "search", k=10, query="other words"))


def _same(a: dict, b: dict) -> None:
    assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
    np.testing.assert_allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]], rtol=0, atol=1e-5)


def test_exclude_seen_drops_exactly_the_seen_items(client, served, users):
    store = SQLiteUserStateStore(served.settings.user_states_path)
    seen = set(store.get([users[1]], served.champion.release_id)[users[1]].seen_items.tolist())
    k = 5
    kept = client.post("/retrieve", json={"user_id": users[1], "k": k}).json()["items"]
    every = client.post("/retrieve", json={"user_id": users[1], "k": k + len(seen),
                                           "exclude_seen": False}).json()["items"]
    assert [i for i in every if i["item_id"] not in seen][:k] == kept


def test_unknown_user_gets_the_context_items_neighbours(client, hybrid, items):
    r = client.post("/retrieve", json={"user_id": 10**15, "context": {"item_id": items[3], "surface": "related"},
                                       "k": 4}).json()
    assert r["path"] == "context"
    release = hybrid.bundle.release
    row = int(np.flatnonzero(release.item_ids == items[3])[0])
    v = np.asarray(release.item_vectors, dtype=np.float64)
    cos = v @ v[row]  # exact cosine: the vectors are unit length
    cos[row] = -np.inf  # never the viewed item itself
    top = np.argsort(-cos, kind="stable")[:4]
    assert [i["item_id"] for i in r["items"]] == release.item_ids[top].tolist()
    np.testing.assert_allclose([i["score"] for i in r["items"]], cos[top], atol=1e-5)


def test_unknown_user_without_context_gets_the_most_popular_items(client, hybrid):
    r = client.post("/retrieve", json={"user_id": -5, "k": 3}).json()
    assert r["path"] == "popularity"
    log_q = hybrid.bundle.release.q_table  # log q of item index i at position i; 0 is padding
    top = np.argsort(-log_q[1:], kind="stable")[:3]
    assert [i["item_id"] for i in r["items"]] == hybrid.bundle.vocab.item_ids[top].tolist()
    np.testing.assert_allclose([i["score"] for i in r["items"]], np.exp(log_q[1:][top]), rtol=1e-6)


@pytest.mark.parametrize(("body", "status", "message"), [
    ('{"user_id": 1, "k": ', 400, "malformed JSON body"),
    ("[1, 2]", 422, "Input should be a valid dictionary"),
    ({"k": 5}, 422, "user_id: Field required"),
    ({"user_id": "12"}, 422, "user_id: Input should be a valid integer"),
    ({"user_id": 1.5}, 422, "user_id: Input should be a valid integer"),
    ({"user_id": 2**70}, 422, "user_id: Input should be less than or equal to"),
    ({"user_id": 1, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"user_id": 1, "k": 201}, 422, "k must be between 1 and 200, got 201"),
    ({"user_id": 1, "k": "10"}, 422, "k: Input should be a valid integer"),
    ({"user_id": 1, "context": {"surface": "moon"}}, 422, "context.surface: Input should be 'homefeed'"),
    ({"user_id": 1, "context": {"item_id": 987654321}}, 422, "context.item_id 987654321 is not in the catalog"),
    ({"user_id": 1, "context": "related"}, 422, "context: Input should be a valid dictionary"),
    ({"user_id": 1, "exclude_seen": "yes"}, 422, "exclude_seen: Input should be a valid boolean"),
    ({"user_id": 1, "kk": 3}, 422, "kk: Extra inputs are not permitted"),
    ({"user_id": 1, "context": {"surface": "search", "query": "q" * 257}}, 422,
     "context.query has 257 characters; at most 256 are allowed"),
    ({"user_id": 1, "context": {"surface": "homefeed", "query": "shoes"}}, 422,
     "context.query is only allowed on the 'search' surface, got surface 'homefeed'"),
    ({"user_id": 1, "context": {"surface": "search", "query": 7}}, 422, "context.query: Input should be a valid string"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(client, body, status, message):
    r = (client.post("/retrieve", content=body, headers={"content-type": "application/json"})
         if isinstance(body, str) else client.post("/retrieve", json=body))
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.get("/healthz").status_code == 200  # and the service goes on


def test_the_direct_route_answers_valid_bodies_and_hands_everything_else_to_the_app():
    """DirectRoute (the /retrieve hot path past FastAPI's routing): the handler's bytes for a body it answers; the
    app, with the body replayed whole, for a body it raises on, another path or another method."""
    import asyncio

    from towerflow.serving.app import DirectRoute

    reached = []

    async def app(scope, receive, send):  # the FastAPI app's stand-in: records what reached it, answers 418
        message = await receive()
        reached.append((scope["method"], scope["path"], message.get("body", b"")))
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    async def handler(body: bytes) -> bytes:
        if body != b'{"ok": 1}':
            raise ValueError("not mine")
        return b'{"answer": 42}'

    route = DirectRoute(app, path="/retrieve", handler=handler)

    def call(method: str, path: str, chunks: list[bytes]) -> tuple[int, dict, bytes]:
        pieces, sent = list(chunks), []

        async def receive():
            body = pieces.pop(0) if pieces else b""
            return {"type": "http.request", "body": body, "more_body": bool(pieces)}

        async def send(message):
            sent.append(message)

        asyncio.run(route({"type": "http", "method": method, "path": path, "headers": []}, receive, send))
        return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    assert call("POST", "/retrieve", [b'{"ok"', b': 1}']) == (
        200, {b"content-length": b"14", b"content-type": b"application/json"}, b'{"answer": 42}')
    assert reached == []  # answered without the app
    assert call("POST", "/retrieve", [b'{"ok"', b': 2}'])[::2] == (418, b"app")
    assert call("POST", "/release", [b"{}"])[::2] == (418, b"app")
    assert call("GET", "/retrieve", [b""])[::2] == (418, b"app")
    assert reached == [("POST", "/retrieve", b'{"ok": 2}'), ("POST", "/release", b"{}"), ("GET", "/retrieve", b"")]


def test_a_request_the_direct_route_fails_is_answered_with_its_error_not_retrieved_again(tmp_path):
    """The route answers DirectRoute's error through the app's handlers; it does not run the request a second time
    (a 4xx computed twice, or a failure masked by a retry that happened to work, unlogged)."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from towerflow.serving.app import create_app
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RequestError

    batches: list[list[int]] = []

    def retrieve_batch(queries):
        batches.append([q.user_id for q in queries])
        if len(batches) == 1:  # a failure that would not recur on a second try
            raise RuntimeError("state store read failed")
        return [RequestError(f"k {q.k} refused") if q.k == 13 else
                {"release": "r-1", "version": 1, "path": "state", "items": []} for q in queries]

    service = SimpleNamespace(config=ServingConfig(), settings=SimpleNamespace(data_root=tmp_path),
                              retrieve_batch=retrieve_batch)
    with TestClient(create_app(service=service), raise_server_exceptions=False) as c:
        r = c.post("/retrieve", json={"user_id": 1, "k": 3})
        assert (r.status_code, r.json()) == (500, {"detail": "internal error: RuntimeError: state store read failed"})
        assert batches == [[1]]
        r = c.post("/retrieve", json={"user_id": 2, "k": 13})
        assert (r.status_code, r.json()) == (422, {"detail": "k 13 refused"})
        assert batches == [[1], [2]]
        r = c.post("/retrieve", json={"user_id": 3, "k": 3})
        assert r.status_code == 200 and r.json()["release"] == "r-1" and batches[-1] == [3]
        assert c.post("/retrieve", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        assert len(batches) == 3


def test_a_retrieve_answered_on_the_direct_route_is_the_services_answer(client, hybrid, users, items):
    r = client.post("/retrieve", json={"user_id": users[1], "context": {"item_id": items[0], "surface": "related"},
                                       "k": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == hybrid.retrieve(users[1], items[0], "related", 5)


def _garbage(user: int, release: str, dim: int) -> UserState:
    return UserState(user, release, np.full(dim, 7.0, dtype=np.float32), HORIZON, HORIZON, np.zeros(0))


def test_a_state_of_another_release_is_never_used(served, online, users, items):
    champ, other = served.champion.release_id, served.other.release_id
    dim = online.bundle.history_dim
    store = InMemoryUserStateStore()
    store.put([_garbage(users[0], other, dim),  # refreshed with another release: recomputed online
               _garbage(users[1], champ, dim + 1)])  # the right id but not this tower's size
    svc = service_for(served, store=store)
    try:
        for u in users[:2]:
            got, ref = svc.retrieve(u, items[0], "related", k=8), online.retrieve(u, items[0], "related", k=8)
            assert got["path"] == "online" and got["release"] == champ
            assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in ref["items"]]
    finally:
        svc.close()

    cold = service_for(served, store=store, on_missing_state="cold")
    try:  # by config, a user without a state of the served release is answered as an unknown user
        assert cold.retrieve(users[0], items[0], "related", k=3)["path"] == "context"
        assert cold.retrieve(users[0], None, "homefeed", k=3)["path"] == "popularity"
    finally:
        cold.close()


class _StoreIgnoringReleases(InMemoryUserStateStore):
    """A faulty store (say, a cache keyed by user only): it hands back whatever state it has."""

    def get(self, user_ids, release_id):
        return {int(u): s for (_, su), s in self._states.items() for u in user_ids if su == int(u)}


def test_the_service_checks_the_release_of_every_state_it_is_handed(served, online, users):
    store = _StoreIgnoringReleases()
    store.put([_garbage(users[2], served.other.release_id, online.bundle.history_dim)])
    svc = service_for(served, store=store)
    try:
        got, ref = svc.retrieve(users[2], k=6), online.retrieve(users[2], k=6)
        assert got["path"] == "online" and svc.mismatched_states == 1
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in ref["items"]]
    finally:
        svc.close()


def test_a_tower_and_item_vectors_of_different_models_are_refused(served, champion_release):
    """Checksums pass, ids match, sizes match: only the vectors tell that the tower is another model's."""
    from dataclasses import replace

    from towerflow.infra.releases import ReleaseIntegrityError, fetch_release, load_release_dir
    from towerflow.serving.bundle import build_bundle

    other = load_release_dir(fetch_release(served.settings, int(served.other.model_version)).path)
    assert build_bundle(other, None).release_id == served.other.release_id  # each is fine on its own
    mixed = replace(champion_release, model=other.model)  # champion's index and vectors, the other's towers
    with pytest.raises(ReleaseIntegrityError, match="not its item tower's"):
        build_bundle(mixed, None)
