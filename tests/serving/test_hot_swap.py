"""Hot swap under load: a real server (uvicorn on loopback) keeps answering while the champion is promoted;
every response is exactly what the release it names answers, and each client sees the switch once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.servers import running_app
from towerflow.serving.app import create_app
from towerflow.serving.config import ServingConfig


@pytest.fixture
def server(served):
    app = create_app(served.settings, ServingConfig(poll_interval_s=0.1))
    with running_app(app, log_level="warning") as url:
        yield url, app


def _requests(bundle) -> list[dict]:
    users = [int(u) for u in bundle.profiles.user_ids[:6]] + [10**12]  # known users and one unknown
    items = [int(i) for i in bundle.vocab.item_ids[[3, 50]]]
    return [{"user_id": u, "context": c, "k": 5} for u in users
            for c in ({"surface": "homefeed"}, {"item_id": items[0], "surface": "related"},
                      {"item_id": items[1], "surface": "search"})]


def _key(req: dict) -> str:
    return repr(sorted((k, repr(v)) for k, v in req.items()))


def _answers(url: str, requests: list[dict]) -> dict[str, list[int]]:
    with httpx.Client(base_url=url, timeout=30) as c:
        return {_key(r): [i["item_id"] for i in c.post("/retrieve", json=r).json()["items"]] for r in requests}


def test_promotion_swaps_release_under_load_and_every_response_is_consistent(served, server):
    from towerflow.infra.promote import promote, rollback

    url, app = server
    champ, other = served.champion.release_id, served.other.release_id
    requests = _requests(app.state.service.bundle)
    before = _answers(url, requests)  # what the champion answers, computed quietly
    log: list[list[tuple[float, str, int, str, list[int]]]] = [[] for _ in range(4)]
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = n
            while not stop.is_set():
                req = requests[i % len(requests)]
                r = c.post("/retrieve", json=req)
                body = r.json() if r.status_code == 200 else {}
                log[n].append((time.monotonic(), _key(req), r.status_code, body.get("release", r.text),
                               [x["item_id"] for x in body.get("items", [])]))
                i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        result = promote(int(served.other.model_version), served.settings)
        assert result.changed and result.release_id == other
        deadline = time.monotonic() + 60
        while app.state.service.bundle.release_id != other:
            assert time.monotonic() < deadline, "the service did not pick up the new champion"
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        after = _answers(url, requests)  # what the new champion answers
        info = httpx.get(f"{url}/release").json()
        assert info["release"] == other and info["swaps"] == 1 and info["last_error"] is None
    finally:
        stop.set()
        rollback(served.settings)  # the champion goes back for the other tests
    expected = {champ: before, other: after}
    assert before != after  # two different models: a mix-up would show
    for entries in log:
        assert entries, "a client sent nothing"
        releases = [e[3] for e in entries]
        assert all(e[2] == 200 for e in entries), [e for e in entries if e[2] != 200][:3]
        assert set(releases) <= {champ, other}
        # each client switches once, from the old release to the new one, never back
        switched = releases.index(other) if other in releases else len(releases)
        assert releases[:switched] == [champ] * switched and releases[switched:] == [other] * (len(releases) - switched)
        for _, key, _, release, ids in entries:
            assert ids == expected[release][key]  # answered by the tower AND index of the release it names
    assert sum(e[3] == other for entries in log for e in entries) > 0
    assert sum(e[3] == champ for entries in log for e in entries) > 0
