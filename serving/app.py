"""The HTTP layer: ``POST /retrieve``, ``GET /healthz``, ``GET /release`` over ``serving.service.RetrievalService``.

    POST /retrieve {"user_id": 42, "context": {"item_id": 1234, "surface": "related"}, "k": 10, "exclude_seen": true}
      -> 200 {"release": "r-...", "version": 3, "path": "state", "items": [{"item_id": 77, "score": 0.81}, ...]}

Every error is JSON ``{"detail": "<what is wrong>"}``: 400 malformed JSON; 413 a body over
``ServingConfig.max_body_bytes`` (64 KiB), refused while it is read; 415 a body that is not ``application/json``;
422 wrong types, missing or unknown fields, k out of range, a context item the served release does not know (in
neither its catalog nor its live items), a
``context.query`` over 256 characters or on a surface other than ``search``; 503 before any release is loaded.
``{"context": {"surface": "search", "query": "kalo venmi"}}`` joins the query to the context (online only).

    POST /recommend {"user_id": 42, "context": {"surface": "homefeed"}, "k": 10, "candidates": 200}
      -> 200 {"release": "r-...", "version": 3, "path": "state", "items": [{"item_id": 77, "score": 1.32,
              "heads": {"click": 0.41, "save": 0.12, ...}, "sources": {"two_tower": 0.81}}, ...]}

The two stages (serving/recommend.py): the ``candidates`` items /retrieve would give (seen items excluded), ranked
by the SAME release's TransAct + DCN v2 ranker against the user's action sequence (recent + live actions); the top
k by blended score, with each head's probability and the generators that found the item. The same request checks
as /retrieve (422), plus candidates in 1..max_k and k in 1..candidates; 409 when the served release has no ranker.

    POST /events {"events": [{"event_id": "e1", "user_id": 42, "item_id": 77, "action": "click",
                              "ts": "2026-01-05T10:00:00Z", "surface": "homefeed"}, ...]}
      -> 200 {"accepted": 1, "duplicates": 0, "last_seq": 1}

Live events (serving/realtime/): checked by the data gate's rules and stored whole, durably, before the reply;
idempotent by event_id. 422 names the first bad row ({"detail": "events[3].action: ...", "row": 3}); 409 an
event_id already stored as a different event.

    POST /items {"items": [{"item_id": 9001, "category": "topic_03", "genres": "kalo|mira", "title": "...",
                            "created_ts": "2026-01-05T10:00:00Z", "features": [0.1, ...]}, ...]}
      -> 200 {"accepted": 1, "duplicates": 0, "live_items": 1, "release": "r-..."}

Live items (serving/realtime/live_items.py): checked by the items table's rules, written to the source's items
table, embedded by the served release's item tower and retrievable by the next /retrieve; GET /release counts them
(``live_items``). Idempotent by item_id; 422 names the first bad row, 409 an item_id the table holds as another
item. Unknown users are not an error: they get the context item's neighbours, or the most
popular items. ``/docs``, ``/redoc`` and ``/openapi.json`` exist only with ``ServingConfig.docs``
(``towerflow serve --docs``), and no response names a local filesystem path (``GET /release``, errors).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import faiss
import orjson
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from towerflow.config import Settings
from towerflow.serving.batcher import MicroBatcher
from towerflow.serving.config import ServingConfig
from towerflow.serving.realtime.events import EventBatchError
from towerflow.serving.realtime.store import ConflictError
from towerflow.serving.service import NoRankerError, Query, RequestError, RetrievalService, ServiceNotReady

log = logging.getLogger("towerflow.serving")
INT64 = 2**63 - 1


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: StrictInt | None = Field(None, ge=-INT64 - 1, le=INT64, description="The item being viewed, if any.")
    surface: Literal["homefeed", "related", "search"] = "homefeed"
    query: StrictStr | None = Field(None, description="What the user typed: on the 'search' surface only, at most "
                                                      "256 characters (422 otherwise).")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictInt = Field(ge=-INT64 - 1, le=INT64)
    context: Context = Field(default_factory=Context)
    k: StrictInt = Field(10, ge=1, description="How many items; at most ServingConfig.max_k.")
    exclude_seen: StrictBool = Field(True, description="Drop items the user already acted on.")


class Item(BaseModel):
    item_id: int
    score: float


class RetrieveResponse(BaseModel):
    release: str = Field(description="The release whose user tower AND index produced these items.")
    version: int | None = Field(description="Its registered model version.")
    path: Literal["state", "live", "online", "context", "popularity"] = Field(
        description="state: stored history state + live context; live: history encoded from the source's recent "
                    "events plus the user's live ones (ingested after the state); online: history encoded from "
                    "recent events; "
                    "context: unknown user, the context item's neighbours; popularity: unknown user, no context.")
    items: list[Item]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictInt = Field(ge=-INT64 - 1, le=INT64)
    context: Context = Field(default_factory=Context)
    k: StrictInt = Field(10, ge=1, description="How many ranked items; at most candidates.")
    candidates: StrictInt = Field(200, ge=1, description="How many retrieved items the ranker scores (seen items "
                                                         "excluded); at most ServingConfig.max_k.")


class RankedItem(BaseModel):
    item_id: int
    score: float = Field(description="The ranker's blended score: sum of head weight x head probability.")
    heads: dict[str, float] = Field(description="Each head's probability (click, save, conversion, skip, hide).")
    sources: dict[str, float] = Field(description="The generators that found the item and their retrieval scores.")


class RecommendResponse(BaseModel):
    release: str = Field(description="The release whose index retrieved AND whose ranker ranked these items.")
    version: int | None
    path: str = Field(description="How the retrieval user vector was obtained (as in /retrieve).")
    items: list[RankedItem]


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[dict[str, Any]] = Field(min_length=1, description="Events in the contract (towerflow/contract.py); "
                                                                   "context_item_id and query may be left out.")


class ItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1, description="Catalog rows in the contract's items columns "
                                                                  "(item_id, category, genres, title, created_ts) "
                                                                  "plus features; all but item_id and category may "
                                                                  "be left out.")


class ItemsResponse(BaseModel):
    accepted: int = Field(description="New items written to the source's items table.")
    duplicates: int = Field(description="Items the table already held with the same fields (not written again).")
    live_items: int = Field(description="Items the served release lacks that it now serves from its side index.")
    release: str = Field(description="The release whose item tower embedded them.")


class EventsResponse(BaseModel):
    accepted: int = Field(description="New events stored.")
    duplicates: int = Field(description="Events already stored under their event_id (acknowledged, not re-stored).")
    last_seq: int = Field(description="The action store's highest sequence number after this batch.")


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """``body`` as ``model``, with the errors FastAPI gives for a body parameter (loc starting with "body").

    The hot path parses its body here: FastAPI's own body handling costs several times the pydantic validation.
    """
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": exc.msg}}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _inline_refs(schema: dict) -> dict:
    """A model's JSON schema with its ``$defs`` written in place (the body is documented without a named component)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk({**defs[ref.rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


def _describe(errors: list[dict]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


# an absolute path, also as a URI with no host (file:///abs, sqlite:////abs, scheme:/abs), kept as
# ".../<last part>"; not a URL with a host (scheme://host/...: http, s3, ...), whose path says nothing local
_ABS_PATH = re.compile(r"(?<![\w:/.~>+-])[A-Za-z][\w+.-]*:(?:/{3,}|/(?!/))[^\s'\"(),;]+|(?<![\w:/.~>-])/[^\s'\"(),;]+")


def redact_paths(text: str, data_root: Path | None = None) -> str:
    """``text`` with no local filesystem path: the data root becomes ``<data_root>``, any other absolute path
    ``.../<its last part>`` (enough to name the file, nothing about the machine's layout)."""
    if data_root is not None:
        for root in {str(data_root.resolve()), str(data_root)} - {"", "."}:
            text = text.replace(root, "<data_root>")
    return _ABS_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def _public(value: Any, data_root: Path | None) -> Any:
    """A JSON value with every string passed through ``redact_paths``."""
    if isinstance(value, str):
        return redact_paths(value, data_root)
    if isinstance(value, dict):
        return {k: _public(v, data_root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_public(v, data_root) for v in value]
    return value


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class BodyGuard:
    """ASGI middleware for requests with a body (POST/PUT/PATCH): 415 unless the content type is JSON, 413 once
    the body passes ``max_bytes``. The body is read here, chunk by chunk, and refused as soon as it is too long
    (a declared Content-Length too large is refused before reading anything), so no more than ``max_bytes`` plus
    one chunk is ever held; an accepted body is handed on to the app unchanged."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        where = f"{scope['method']} {scope['path']}"
        ctype = headers.get("content-type")
        if ctype is None or not _is_json(ctype):
            got = f"content type {ctype!r}" if ctype else "no content type"
            await _send_json(send, 415, f"{where} takes application/json, got {got}")
            return
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            await _send_json(send, 400, f"Content-Length {declared!r} is not a number of bytes")
            return
        if declared is not None and int(declared) > self.max_bytes:
            await _send_json(send, 413, f"request body of {declared} bytes refused: the limit is {self.max_bytes} "
                                        f"bytes (ServingConfig.max_body_bytes)")
            return
        try:
            body = await _read_body(receive, self.max_bytes)
        except _BodyTooLarge:
            await _send_json(send, 413, f"request body over {self.max_bytes} bytes refused: the limit is "
                                        f"{self.max_bytes} bytes (ServingConfig.max_body_bytes)")
            return
        if body is not None:  # None: the client went away
            await self.app(scope, _replay(body, receive), send)


class _BodyTooLarge(Exception):
    """The body being read passed its limit (``_read_body``)."""


async def _read_body(receive, max_bytes: int | None = None) -> bytes | None:
    """The request body from ASGI ``receive``, chunk by chunk; None when the client disconnects first;
    _BodyTooLarge as soon as it passes ``max_bytes`` (no more than that plus one chunk is ever held)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: the client went away
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that hands ``body`` whole once, then defers to ``receive`` (for the disconnect)."""
    handed = False

    async def replay():
        nonlocal handed
        if not handed:
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class DirectRoute:
    """ASGI middleware: ``POST path`` answered 200 with ``handler(body)``'s JSON bytes, past FastAPI's routing,
    dependency solving, Request and Response objects: on ``/retrieve`` under load they cost the event loop more
    than the parsing, validation and batching of the request itself (bench.serving --floor, README). A request
    the handler does not answer (it raises: malformed JSON, bad fields, a RequestError, no release yet) goes on to
    the app with the exception in ``scope[DirectRoute.ERROR]``; the route raises it (``raise_direct_error``) for the
    app's exception handlers to answer as they always do: every error status and body stays theirs, the route stays
    in the OpenAPI schema, and the request is not answered a second time (an error is not computed twice, and a
    failure that would not recur is answered, and logged, as the failure it was). Sits inside BodyGuard (content
    type and size checked)."""

    ERROR = "towerflow.direct_route.error"

    def __init__(self, app, path: str, handler: Callable[[bytes], Awaitable[bytes]]):
        self.app, self.path, self.handler = app, path, handler

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        try:
            out = await self.handler(body)
        except Exception as exc:  # noqa: BLE001 - the app's route raises it again, for the app's error handlers
            await self.app({**scope, self.ERROR: exc}, _replay(body, receive), send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(out)), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})


def raise_direct_error(request: Request) -> None:
    """In the route behind a ``DirectRoute``: raise the exception its handler met on this request, if any."""
    exc = request.scope.get(DirectRoute.ERROR)
    if exc is not None:
        raise exc


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None, config: ServingConfig | None = None, *,
               service: RetrievalService | None = None, watch: bool = True) -> FastAPI:
    """The FastAPI app. Without ``service`` it builds one from ``settings``/``config``, loads the release at
    startup and watches the alias until shutdown; a ``service`` passed in is used as is (its owner starts and
    closes it)."""
    owned = service is None
    service = service or RetrievalService(settings or Settings(), config)
    config, data_root = service.config, service.settings.data_root

    def answer(queries: list[Query]) -> list[bytes | Exception]:
        # on a batch worker: the JSON is written there too, not on the event loop; orjson: the json module took
        # 20 us per 10-item response, a fifth of the worker's time under load (numpy scalars allowed, as a guard)
        return [out if isinstance(out, Exception) else orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
                for out in service.retrieve_batch(queries)]

    # OpenMP's thread count is per thread: a new worker starts at one OpenMP thread per core, whatever `towerflow
    # serve --torch-threads` set here, and a FAISS search from it then spins those on the cores the loop needs.
    # Every thread that searches sets it first.
    pin_omp_threads = functools.partial(faiss.omp_set_num_threads, faiss.omp_get_max_threads())
    batcher = MicroBatcher(answer, max_batch=config.batch_max_size, max_wait_s=config.batch_wait_ms / 1e3,
                           threads=config.batch_threads, initializer=pin_omp_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            service.start(watch=watch)
        try:
            yield
        finally:
            batcher.close()
            if owned:
                service.close()

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    # no OpenTelemetry providers are configured here: FastAPI would still look them up on every request
    telemetry = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(title="towerflow retrieval", lifespan=lifespan, telemetry=telemetry, **docs,
                  description="Two-tower retrieval: history states computed offline, context combined online.")
    app.state.service, app.state.batcher = service, batcher

    async def retrieve_body(body: bytes) -> bytes:
        req = parse_body(RetrieveRequest, body)
        # gathered with the requests that arrive meanwhile and answered on a worker thread (serving/batcher.py)
        return await batcher.submit(Query(req.user_id, req.context.item_id, req.context.surface, req.k,
                                          req.exclude_seen, req.context.query))

    # the hot path answered straight from the body (DirectRoute); the /retrieve route below answers what it cannot
    app.add_middleware(DirectRoute, path="/retrieve", handler=retrieve_body)
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes)  # added last: the outer one, checked first

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            ctx = bad_json[0].get("ctx") or {}
            pos = bad_json[0].get("loc", ("body", "?"))[-1]
            return JSONResponse({"detail": f"malformed JSON body: {ctx.get('error', 'cannot decode')} "
                                           f"(at character {pos})"}, status_code=400)
        return JSONResponse({"detail": _describe(errors),
                             "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                                        for e in errors]}, status_code=422)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": redact_paths(str(exc), data_root)}, status_code=422)

    @app.exception_handler(EventBatchError)
    async def _bad_batch(request: Request, exc: EventBatchError) -> JSONResponse:
        return JSONResponse({"detail": redact_paths(str(exc), data_root), "row": exc.row}, status_code=422)

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "row": exc.row}, status_code=409)

    @app.exception_handler(NoRankerError)
    async def _no_ranker(request: Request, exc: NoRankerError) -> JSONResponse:
        return JSONResponse({"detail": redact_paths(str(exc), data_root)}, status_code=409)

    @app.exception_handler(ServiceNotReady)
    async def _not_ready(request: Request, exc: ServiceNotReady) -> JSONResponse:
        return JSONResponse({"detail": redact_paths(str(exc), data_root)}, status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": redact_paths(f"internal error: {type(exc).__name__}: {exc}", data_root)},
                            status_code=500)

    @app.post("/retrieve", response_model=RetrieveResponse,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _inline_refs(RetrieveRequest.model_json_schema())}}}})
    async def retrieve(request: Request) -> Response:
        # what DirectRoute passed on: the error it met, answered by the handlers above (not retrieved again)
        raise_direct_error(request)
        # already the response's shape: no re-validation
        return Response(await retrieve_body(await request.body()), media_type="application/json")

    @app.post("/recommend", response_model=RecommendResponse,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": _inline_refs(RecommendRequest.model_json_schema())}}}})
    async def recommend(request: Request) -> Response:
        req = parse_body(RecommendRequest, await request.body())
        # retrieval and ranking on a worker thread (torch releases the GIL), off the event loop
        def rank() -> dict:
            pin_omp_threads()  # a thread of Starlette's pool, not the batcher's: see pin_omp_threads
            return service.recommend(req.user_id, req.context.item_id, req.context.surface, req.k, req.candidates,
                                     req.context.query)

        out = await run_in_threadpool(rank)
        return Response(json.dumps(out), media_type="application/json")

    @app.post("/events", response_model=EventsResponse)
    def events(req: EventsRequest) -> dict:
        # on a worker thread: the store's commit waits for the disk (fsync), requests need not wait with it
        return service.ingest(req.events)

    @app.post("/items", response_model=ItemsResponse)
    def items(req: ItemsRequest) -> dict:
        # on a worker thread: the items table is rewritten (and fsynced) before the reply
        return service.add_items(req.items)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        b = service.bundle
        if b is None:
            return JSONResponse({"status": "starting", "release": None}, status_code=503)
        return JSONResponse({"status": "ok", "release": b.release_id, "version": b.release.version})

    @app.get("/release")
    def release() -> dict:
        # the release's local directory is the server's business; its errors may name files: redacted
        status = {k: v for k, v in service.status().items() if k != "path"}
        status["batches"] = {"answered": batcher.batches, "requests": batcher.queries}  # mean size: their ratio
        return _public(status, data_root)

    return app
