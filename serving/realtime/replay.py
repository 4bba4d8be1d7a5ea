"""Replay a day of the event source into a running service, in time order, asking ``/retrieve`` before each
engagement (issue #16 item 6): what the service would have answered at that moment, and whether the engaged item
was among its top k.

The day's events are sent in ``POST /events`` batches; before each engagement (a positive action: click, save,
conversion) the events before it are flushed and ``/retrieve`` is asked for that user with the engagement's context
(its ``context_item_id``, if the service knows it: in the release's catalog or a live item; and surface); then the engagement itself is sent. With
``speed`` the replay keeps the day's pace, ``speed`` times faster (1: real time); without it, as fast as the
service answers.

New items (``items``: the catalog rows created that day): each is sent to ``POST /items`` before the first event at
or after its ``created_ts`` (``post_items``; the service embeds it with its release's item tower), and engagements
with them are counted apart (``created_*``): a release built before the day cannot answer them otherwise.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pandas as pd

from towerflow.contract import POSITIVE_ACTIONS
from towerflow.errors import TowerflowError


class ReplayError(TowerflowError):
    """The service refused or could not be reached; the message names the request and the reply."""


@dataclass
class ReplayResult:
    events: int = 0  # events acknowledged by the service
    engagements: int = 0  # engagements asked about
    hits: int = 0  # engagements whose item was in the top k asked just before
    new_engagements: int = 0  # engagements on an item the user had not acted on earlier in the replay
    new_hits: int = 0  # ... in the top k (exclude_seen drops the other kind, whatever the service knows)
    paths: dict[str, int] = field(default_factory=dict)  # /retrieve answers by path
    surfaces: dict[str, list[int]] = field(default_factory=dict)  # surface -> [engagements, hits, new ones, new hits]
    items: int = 0  # new items sent to POST /items
    created_engagements: int = 0  # engagements on an item created during the replay (``items``)
    created_hits: int = 0  # ... in the top k
    seconds: float = 0.0

    @property
    def recall(self) -> float:
        return self.hits / self.engagements if self.engagements else 0.0

    def to_dict(self) -> dict:
        new = self.new_hits / self.new_engagements if self.new_engagements else 0.0
        created = self.created_hits / self.created_engagements if self.created_engagements else 0.0
        return {"events": self.events, "engagements": self.engagements, "hits": self.hits,
                "recall_at_k": round(self.recall, 4), "new_engagements": self.new_engagements,
                "new_hits": self.new_hits, "recall_at_k_new_items": round(new, 4), "items_posted": self.items,
                "created_engagements": self.created_engagements, "created_hits": self.created_hits,
                "recall_at_k_created_items": round(created, 4), "paths": self.paths,
                "recall_at_k_by_surface": {s: {"engagements": e, "recall_at_k": round(h / e, 4), "new_engagements": ne,
                                               "recall_at_k_new_items": round(nh / ne, 4) if ne else 0.0}
                                           for s, (e, h, ne, nh) in sorted(self.surfaces.items())},
                "seconds": round(self.seconds, 2)}


class Client:
    """One keep-alive HTTP connection to the service, JSON in and out."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ReplayError(f"{url!r}: expected http://HOST:PORT")
        self.url, self._con = url.rstrip("/"), http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                                          timeout=timeout_s)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        try:
            self._con.request("POST", path, data, {"Content-Type": "application/json"})
            resp = self._con.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        except (OSError, http.client.HTTPException) as exc:
            self._con.close()
            raise ReplayError(f"{self.url}{path}: cannot reach the service ({exc})") from None

    def close(self) -> None:
        self._con.close()


def _json_rows(events: pd.DataFrame) -> list[dict]:
    return json.loads(events.to_json(orient="records", date_format="iso", date_unit="us"))


def item_rows(items: pd.DataFrame) -> list[dict]:
    """Items table rows -> POST /items payloads (the contract's columns and ``features``, JSON types)."""
    cols = [c for c in ("item_id", "category", "genres", "title", "created_ts", "features") if c in items.columns]
    rows = items[cols].to_dict(orient="records")
    for r in rows:
        r["item_id"] = int(r["item_id"])
        for c in ("genres", "title"):
            if c in r and (r[c] is None or (isinstance(r[c], float) and r[c] != r[c])):
                r[c] = None
        if "created_ts" in r:
            r["created_ts"] = None if pd.isna(r["created_ts"]) else pd.Timestamp(r["created_ts"]).isoformat()
        if "features" in r:
            f = r["features"]
            r["features"] = None if f is None or (isinstance(f, float) and f != f) else [float(x) for x in f]
    return rows


def replay(events: pd.DataFrame, client: Client, *, k: int = 10, speed: float | None = None,
           batch: int = 300, ingest: bool = True, items: pd.DataFrame | None = None, post_items: bool = True,
           items_batch: int = 100, on_step: Callable[[ReplayResult], None] | None = None) -> ReplayResult:
    """Replay ``events`` (contract rows) in (ts, event_id) order into the service behind ``client`` (anything
    with ``post(path, body) -> (status, reply)``). ``ingest`` False: only ask (the service's states stay frozen).
    ``items``: rows of the items table created during the replay, posted by creation time unless ``post_items``
    is False (the same engagements counted, the items never sent)."""
    events = events.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)
    rows, out, pending, acted = _json_rows(events), ReplayResult(), [], set()
    t_wall, t_data = time.monotonic(), events["ts"].iloc[0] if len(events) else None
    if items is None or len(items) == 0:
        items = pd.DataFrame({"item_id": pd.Series([], dtype="int64"), "created_ts": pd.Series([], dtype=object)})
    items = items.sort_values("created_ts", kind="stable", na_position="first").reset_index(drop=True)
    new_items, created, next_item = item_rows(items) if post_items else [], set(items["item_id"].tolist()), 0
    due = pd.to_datetime(items["created_ts"], utc=True).fillna(pd.Timestamp.min.tz_localize("UTC")).tolist()

    def post_due(ts) -> None:
        nonlocal next_item
        start = next_item
        while next_item < len(new_items) and due[next_item] <= ts:
            next_item += 1
        for s in range(start, next_item, items_batch):
            part = new_items[s:min(s + items_batch, next_item)]
            status, reply = client.post("/items", {"items": part})
            if status != 200:
                raise ReplayError(f"POST /items refused items {part[0]['item_id']}..: {status} "
                                  f"{reply.get('detail', reply)}")
            out.items += len(part)

    def flush() -> None:
        if not ingest:
            pending.clear()
            return
        for s in range(0, len(pending), batch):
            status, reply = client.post("/events", {"events": pending[s:s + batch]})
            if status != 200:
                raise ReplayError(f"POST /events refused events {pending[s]['event_id']}..: {status} "
                                  f"{reply.get('detail', reply)}")
            out.events += len(pending[s:s + batch])
        pending.clear()

    for i, row in enumerate(rows):
        if next_item < len(new_items) and due[next_item] <= events["ts"].iloc[i]:
            flush()  # the events before the item was created go first
            post_due(events["ts"].iloc[i])
        if speed:
            wake = t_wall + (events["ts"].iloc[i] - t_data).total_seconds() / speed  # (not `due`: the items')
            if wake > time.monotonic():
                flush()
                time.sleep(wake - time.monotonic())
        if row["action"] in POSITIVE_ACTIONS:
            flush()
            ctx = {"surface": row["surface"]}
            if row.get("context_item_id") is not None:
                ctx["item_id"] = int(row["context_item_id"])
            status, reply = client.post("/retrieve", {"user_id": row["user_id"], "context": ctx, "k": k})
            if status == 422 and "item_id" in ctx:  # a context item the release does not know: ask without it
                status, reply = client.post("/retrieve", {"user_id": row["user_id"], "k": k,
                                                          "context": {"surface": row["surface"]}})
            if status != 200:
                raise ReplayError(f"POST /retrieve for event {row['event_id']}: {status} "
                                  f"{reply.get('detail', reply)}")
            hit = row["item_id"] in {x["item_id"] for x in reply["items"]}
            out.engagements, out.hits = out.engagements + 1, out.hits + hit
            new = (row["user_id"], row["item_id"]) not in acted
            if new:
                out.new_engagements, out.new_hits = out.new_engagements + 1, out.new_hits + hit
            if row["item_id"] in created:
                out.created_engagements, out.created_hits = out.created_engagements + 1, out.created_hits + hit
            out.paths[reply["path"]] = out.paths.get(reply["path"], 0) + 1
            counts = out.surfaces.setdefault(row["surface"], [0, 0, 0, 0])
            counts[0], counts[1] = counts[0] + 1, counts[1] + hit
            counts[2], counts[3] = counts[2] + new, counts[3] + (hit and new)
            if on_step is not None:
                on_step(out)
        if row["action"] != "impression":
            acted.add((row["user_id"], row["item_id"]))
        pending.append(row)
    flush()
    out.seconds = time.monotonic() - t_wall
    return out
