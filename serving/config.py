"""The retrieval service's typed config (the environment itself comes from ``towerflow.config.Settings``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field("champion", description="Registry alias whose release is served and watched.")
    poll_interval_s: float = Field(5.0, gt=0, description="How often the watcher re-reads the alias.")
    mode: Literal["hybrid", "online"] = Field(
        "hybrid", description="hybrid: stored history states h + live context; online: encode every history "
                              "from recent events on each request (the reference path, and the benchmark's baseline).")
    on_missing_state: Literal["recompute", "cold"] = Field(
        "recompute", description="A user with no state FOR THE SERVED RELEASE (never refreshed, or refreshed for "
                                 "another release): recompute h online from recent events, or answer as for an "
                                 "unknown user (context neighbours / popularity).")
    lookback_days: int | None = Field(
        None, ge=1, description="Window of events kept for the online path; default the history's max age "
                                "(ExamplesConfig.max_history_days), the window the refresh flow reads.")
    as_of: datetime | None = Field(
        None, description="Pin the serving clock (time-gap reference) for replays of past data; default: "
                          "min(now, end of the source's last day).")
    events_reload_s: float = Field(300.0, gt=0, description="How often recent events and profiles are re-read.")
    max_k: int = Field(200, ge=1, description="Largest k a request may ask for.")
    batch_max_size: int = Field(
        32, ge=1, description="Most /retrieve requests answered together (serving/batcher.py): one state read, one "
                              "combine, one index search; 1 answers each request alone.")
    batch_wait_ms: float = Field(
        0.0, ge=0, description="Longest a request waits for others to batch with while a worker is free (0: it goes "
                               "at once; batches still form while every worker is busy, so they grow with the load).")
    batch_threads: int = Field(
        1, ge=1, description="Worker threads answering batches off the event loop; torch, FAISS and SQLite release "
                             "the GIL, so one worker already computes on a second core beside the HTTP loop. More "
                             "workers split the waiting requests into smaller batches that contend for the GIL "
                             "(measured on 2 cores: 3x the event loop's CPU per request with 2 workers).")
    cooccurrence_candidates: int = Field(
        50, ge=0, description="POST /recommend: items the co-occurrence generator adds to the two-tower candidates "
                              "(serving/cooccurrence.py; fitted when a release with a ranker is loaded); 0: off.")
    max_seen: int = Field(1000, ge=0, description="Recent engaged items kept per user for exclude_seen.")
    retry_failed_release_s: float = Field(60.0, ge=0, description="Wait before retrying a release that failed to load.")
    max_body_bytes: int = Field(64 * 1024, ge=1, description="Largest request body accepted (413 beyond it); the "
                                                             "body is refused while it is read, never buffered whole.")
    docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json (towerflow serve --docs).")
    realtime: bool = Field(True, description="Live events (POST /events) in the action store (Settings.realtime_uri) "
                                             "join users' histories and exclude_seen at the next request.")
    realtime_max_actions: int = Field(1000, ge=1, description="A user's live actions read per request, at most.")
    max_clock_skew_s: float = Field(5.0, ge=0, description="How far after the server's clock a live event's ts may "
                                                           "be (later: refused as in the future).")
    live_items: bool = Field(True, description="Items the served release lacks (POST /items, and rows of the source's "
                                               "items table created since it was built) are embedded by its item "
                                               "tower and retrievable at once (serving/realtime/live_items.py).")
    live_items_max: int = Field(100_000, ge=0, description="Live items held at most (searched exactly beside the "
                                                           "release's index); past it POST /items is refused: "
                                                           "retrain to fold them in.")
    compact_interval_s: float | None = Field(
        60.0, gt=0, description="How often the watcher hands acknowledged live events to the event source's day "
                                "partitions (None: never here; run 'towerflow events compact').")
