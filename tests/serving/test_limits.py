"""Hostile requests against the real app (issue #14 item 7): body limit, content type, docs off, no local paths."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from tests.serving.conftest import service_for
from towerflow.serving.app import create_app, redact_paths

LIMIT = 64 * 1024


def _padded(n: int) -> bytes:
    """A valid request body of exactly n bytes (JSON allows trailing spaces)."""
    body = b'{"user_id": 1, "k": 3}'
    return body + b" " * (n - len(body))


def test_the_body_limit_is_64_kib_and_refuses_with_413(client):
    ok = client.post("/retrieve", content=_padded(LIMIT), headers={"content-type": "application/json"})
    assert ok.status_code == 200 and len(ok.json()["items"]) == 3
    r = client.post("/retrieve", content=_padded(LIMIT + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["detail"] == (f"request body of {LIMIT + 1} bytes refused: the limit is {LIMIT} bytes "
                                  "(ServingConfig.max_body_bytes)")
    chunked = client.post("/retrieve", content=iter([_padded(LIMIT), b" "]),  # no Content-Length: counted
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and f"over {LIMIT} bytes refused" in chunked.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_the_limit_is_a_setting(served):
    svc = service_for(served, max_body_bytes=100)
    try:
        with TestClient(create_app(service=svc)) as c:
            assert c.post("/retrieve", content=_padded(100), headers={"content-type": "application/json"}).is_success
            assert c.post("/retrieve", content=_padded(101),
                          headers={"content-type": "application/json"}).status_code == 413
    finally:
        svc.close()


def _drive(app, chunk: int, total: int) -> tuple[int, int, dict]:
    """Send a ``total``-byte chunked body in ``chunk``-byte pieces straight through ASGI, as a server would.
    -> (chunks the app pulled, status, JSON body)."""
    pulled, sent = 0, []
    piece = b" " * chunk

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": piece, "more_body": pulled * chunk < total}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/retrieve", "raw_path": b"/retrieve", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return pulled, sent[0]["status"], json.loads(body)


def test_a_100_mb_body_is_refused_without_being_read(hybrid):
    app = create_app(service=hybrid)
    # 1 MiB pieces: the first is already over 64 KiB; 16 KiB pieces: 4 fit exactly, the 5th goes over
    assert _drive(app, 2**20, 100 * 2**20)[:2] == (1, 413)
    pulled, status, body = _drive(app, 16 * 1024, 100 * 2**20)
    assert (pulled, status) == (5, 413) and "over 65536 bytes refused" in body["detail"]


@pytest.mark.parametrize(("ctype", "detail"), [
    ("text/plain", "POST /retrieve takes application/json, got content type 'text/plain'"),
    ("application/x-www-form-urlencoded", "POST /retrieve takes application/json, got content type 'application/x-www-form-urlencoded'"),
    (None, "POST /retrieve takes application/json, got no content type"),
])
def test_a_body_that_is_not_json_gets_415_naming_its_content_type(client, ctype, detail):
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/retrieve", content=b'{"user_id": 1}', headers=headers)
    assert r.status_code == 415 and r.json()["detail"] == detail


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "Application/JSON", "application/x-req+json"])
def test_json_content_types_are_accepted(client, ctype):
    r = client.post("/retrieve", content=b'{"user_id": 1, "k": 2}', headers={"content-type": ctype})
    assert r.status_code == 200 and len(r.json()["items"]) == 2


def test_docs_are_off_unless_asked_for(client, served):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404
    svc = service_for(served, docs=True)
    try:
        with TestClient(create_app(service=svc)) as c:
            assert c.get("/docs").status_code == c.get("/redoc").status_code == 200
            assert "/retrieve" in c.get("/openapi.json").json()["paths"]
    finally:
        svc.close()


def test_release_names_no_local_path(client, served):
    r = client.get("/release")
    assert r.status_code == 200 and r.json()["release"] == served.champion.release_id
    assert "path" not in r.json()
    root = served.settings.data_root
    assert str(root.resolve()) not in r.text and str(root) not in r.text


def test_redact_paths(tmp_path):
    root = tmp_path / "tf"
    assert redact_paths(f"{root}/releases/r-1/index.faiss does not match", root) == \
        "<data_root>/releases/r-1/index.faiss does not match"
    assert redact_paths("/srv/data/x/index.json says 3x4, (in /srv/data/x)") == \
        ".../index.json says 3x4, (in .../x)"
    assert redact_paths("cannot fetch file:///home/me/mlruns/1/a: gone") == "cannot fetch .../a: gone"
    # URIs with no host name a local path too
    assert redact_paths("store sqlite:////srv/mlflow/mlflow.db is locked") == "store .../mlflow.db is locked"
    assert redact_paths("(at file:/srv/mlruns/7/b, dbm:/var/lib/x.db)") == "(at .../b, .../x.db)"
    # URLs with a host keep their path; relative names, ratios and times are not paths
    assert redact_paths("http://127.0.0.1:5000/api/2.0 said 3/4 of r-1/user_tower at 10:30") == \
        "http://127.0.0.1:5000/api/2.0 said 3/4 of r-1/user_tower at 10:30"
    assert redact_paths("s3://bucket/mlruns/1/a and https://h/x:/y") == "s3://bucket/mlruns/1/a and https://h/x:/y"


@pytest.mark.parametrize(("value", "message"), [("0", "must be at least 1, got 0"), ("64k", "'64k' is not a whole number")])
def test_serve_refuses_a_body_limit_that_is_not_a_positive_number(capsys, value, message):
    from towerflow.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-body-bytes", value])
    assert exc.value.code == 2 and f"argument --max-body-bytes: {message}" in capsys.readouterr().err
