"""Point-in-time training examples and their splits (the history itself is defined in tasks/history.py).

One example = one positive action (click / save / conversion) of a user: the target. Its inputs are what was known
strictly before it: the user's history at the target's time (tasks/history.py: last L actions, positive and
negative, at most ``max_history_days`` old, time gaps from the user's latest action), the event's
``context_item_id`` (the viewed item on ``related``; 0 when none), its surface and, on ``search`` only, its
``query`` as token hashes (models/query.py; a query on another surface is not one the service can receive).

"Before" means strictly earlier ``ts`` for the time split: actions in the same microsecond as the target never
enter its history (no leakage even when importers write several actions with one timestamp). For the
leave-one-out split of public benchmarks (MovieLens has many ratings in the same second) "before" means earlier in
the user's sequence: ordered by ``ts``, then by row order in the events table, as sequential-recommendation
libraries do; the holdout is still the last action of that sequence.

Splits:

- ``time``: train targets are positives in ``[window start, as_of - holdout_days)``; holdout targets are positives in
  ``[as_of - holdout_days, as_of)``, one per user: the user's FIRST positive in the holdout window (deterministic, and
  its history is the state the service had at the start of the day, which is what offline user states serve).
  Holdout histories include train-period events and earlier holdout-window events, never later ones.
- ``leave_one_out``: each user's last positive is the holdout, every earlier positive is a train target.
- ``auto`` (the default): ``time`` when the holdout window holds positives of at least ``auto_min_share`` of the
  window's users or ``auto_min_users`` users, else ``leave_one_out`` (data spread thinly over months, where one day
  holds a handful of users); ``meta["split"]`` and ``meta["split_reason"]`` say which and why.

With ``validation=True`` (the default) a validation split for early stopping is cut the same way just before the
holdout (the ``holdout_days`` before it, or each user's second-to-last positive), so the holdout stays untouched by
model selection. ``Examples.refit_extra`` holds the validation window's positives as training rows (every one, not
one per user; uncapped): what a refit (tasks/refit.py) adds to ``train`` once early stopping has picked the epochs.
The holdout is capped at ``max_holdout_users`` users, sampled with ``seed``.

Events at or after ``as_of`` and events on items missing from the catalog are dropped; users missing from the users
table get user index 0 (unknown demographics).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from towerflow.config import ExamplesConfig
from towerflow.contract import POSITIVE_ACTIONS, SURFACES, ContractError, check_columns
from towerflow.errors import TowerflowError
from towerflow.models.batch import Batch, FeatureSizes, ItemFeatures
from towerflow.models.query import encode_texts, pad_columns
from towerflow.tasks.history import (
    ACTION_INDEX,
    HISTORY_ACTIONS,
    HISTORY_CODES,
    SURFACE_INDEX,
    HistorySpec,
    SeenItems,
    action_codes,
    gap_bucket,
    history_tokens,
    history_window,
    to_us,
)
from towerflow.tasks.vocabulary import (
    Vocab,
    build_vocab,
    feature_sizes,
    item_features,
    item_text,
    user_features,
    value_codes,
)

# names other modules have imported from here since before the split
__all__ = ["ACTION_INDEX", "HISTORY_ACTIONS", "SURFACE_INDEX", "Examples", "ExamplesError", "SeenItems",
           "SequenceExamples", "Vocab", "build_examples", "gap_bucket", "user_features"]
EXAMPLES_FORMAT = 3  # 2: token gaps from the user's latest action, max_history_days; 3: query, item_text


class ExamplesError(TowerflowError):
    """Examples cannot be built or loaded; the message names the reason (empty split, missing file...)."""


# --------------------------------------------------------------------------------------------------- examples


@dataclass
class SequenceExamples:
    """n examples as aligned arrays. Histories are (n, L), left-padded with 0, latest action in the last column."""

    user_idx: np.ndarray  # (n,) int64, 0 = unknown user
    hist_items: np.ndarray  # (n, L) int64
    hist_actions: np.ndarray  # (n, L) int64
    hist_gaps: np.ndarray  # (n, L) int64
    context_items: np.ndarray  # (n,) int64, 0 = no context
    surface: np.ndarray  # (n,) int64
    target_items: np.ndarray  # (n,) int64
    ts: np.ndarray  # (n,) int64 epoch seconds of the target
    query: np.ndarray | None = None  # (n, T) int64 token hashes of the search query, 0-padded; None = no queries

    def __post_init__(self) -> None:
        n = len(self.user_idx)
        if self.query is None:
            self.query = np.zeros((n, 1), dtype=np.int64)
        if self.query.ndim != 2:
            raise ExamplesError(f"SequenceExamples.query must be (n, T), got shape {self.query.shape}")
        for f in fields(self):
            a = getattr(self, f.name)
            if len(a) != n:
                raise ExamplesError(f"SequenceExamples.{f.name} has {len(a)} rows, user_idx has {n}")
        shapes = {self.hist_items.shape, self.hist_actions.shape, self.hist_gaps.shape}
        if len(shapes) != 1 or self.hist_items.ndim != 2:
            raise ExamplesError(f"SequenceExamples: history arrays must share one (n, L) shape; got {shapes}")

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def max_seq_len(self) -> int:
        return self.hist_items.shape[1]

    def history_length(self) -> np.ndarray:
        """(n,) number of real (non-padding) history tokens, at most L."""
        return (self.hist_items > 0).sum(axis=1)

    def take(self, idx) -> SequenceExamples:
        """The rows ``idx`` (an index array or boolean mask) as a new object."""
        return SequenceExamples(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def concat(self, other: SequenceExamples) -> SequenceExamples:
        """These rows followed by ``other``'s (same history length L; queries padded to the wider T)."""
        if other.max_seq_len != self.max_seq_len:
            raise ExamplesError(f"SequenceExamples.concat: history lengths differ ({self.max_seq_len} vs "
                                f"{other.max_seq_len})")
        width = max(self.query.shape[1], other.query.shape[1])
        return SequenceExamples(**{f.name: np.concatenate([pad_columns(getattr(self, f.name), width),
                                                           pad_columns(getattr(other, f.name), width)])
                                   if f.name == "query" else np.concatenate([getattr(self, f.name),
                                                                             getattr(other, f.name)])
                                   for f in fields(self)})

    def to_batch(self, idx, user_feats: np.ndarray) -> Batch:
        """A models.batch.Batch of the rows ``idx``; ``user_feats`` (n_users + 1, F) from ``user_features``."""
        t = {f.name: torch.from_numpy(np.ascontiguousarray(getattr(self, f.name)[idx])) for f in fields(self)}
        return Batch(
            hist_items=t["hist_items"],
            hist_actions=t["hist_actions"],
            hist_gaps=t["hist_gaps"],
            context_items=t["context_items"],
            surface=t["surface"],
            user_feats=torch.from_numpy(np.ascontiguousarray(user_feats[self.user_idx[idx]])),
            target_items=t["target_items"],
            query=t["query"],
        )

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, **{fl.name: getattr(self, fl.name) for fl in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> SequenceExamples:
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls) if f.name in z})

    @classmethod
    def empty(cls, max_seq_len: int) -> SequenceExamples:
        e = np.zeros(0, dtype=np.int64)
        h = np.zeros((0, max_seq_len), dtype=np.int64)
        return cls(e, h, h.copy(), h.copy(), e.copy(), e.copy(), e.copy(), e.copy())


@dataclass
class Examples:
    """Everything the train and evaluate stages need, built once per window and saved so a run can resume."""

    train: SequenceExamples
    holdout: SequenceExamples
    vocab: Vocab
    item_feats: ItemFeatures
    user_feats: np.ndarray  # (n_users + 1, F) int64
    holdout_seen: SeenItems  # per holdout row: items the user acted on before the target (excluded in evaluation)
    valid: SequenceExamples | None = None  # early-stopping split (config.validation), never the holdout
    valid_seen: SeenItems | None = None
    meta: dict = field(default_factory=dict)  # split, as_of, gap_buckets, counts
    item_text: list[str] | None = None  # row i = item index i's title + category (pseudo-queries), "" for row 0
    refit_extra: SequenceExamples | None = None  # the validation window's positives as training rows (refit)

    @property
    def sizes(self) -> FeatureSizes:
        return feature_sizes(self.vocab, self.item_feats)

    def save(self, directory: str | Path) -> Path:
        """Write every part into ``directory`` atomically (a temporary sibling renamed into place)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
        try:
            self.train.save(tmp / "train.npz")
            self.holdout.save(tmp / "holdout.npz")
            if self.valid is not None:
                self.valid.save(tmp / "valid.npz")
            if self.refit_extra is not None:
                self.refit_extra.save(tmp / "refit_extra.npz")
            seen = {"holdout_indptr": self.holdout_seen.indptr, "holdout_indices": self.holdout_seen.indices}
            if self.valid_seen is not None:
                seen |= {"valid_indptr": self.valid_seen.indptr, "valid_indices": self.valid_seen.indices}
            np.savez(tmp / "seen.npz", **seen)
            feats = {"category": self.item_feats.category.numpy(), "genres": self.item_feats.genres.numpy()}
            if self.item_feats.dense is not None:
                feats["dense"] = self.item_feats.dense.numpy()
            if self.item_feats.text is not None:
                feats["text"] = self.item_feats.text.numpy()
            if self.item_text is not None:
                (tmp / "item_text.json").write_text(json.dumps(self.item_text))
            np.savez(tmp / "item_feats.npz", **feats)
            np.save(tmp / "user_feats.npy", self.user_feats)
            (tmp / "vocab.json").write_text(self.vocab.to_json())
            # written last: its presence marks a complete directory
            (tmp / "meta.json").write_text(json.dumps({"format": EXAMPLES_FORMAT, **self.meta}, default=str))
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Examples:
        directory = Path(directory)
        if not (directory / "meta.json").exists():
            raise ExamplesError(f"{directory}: no saved examples (meta.json missing)")
        meta = json.loads((directory / "meta.json").read_text())
        if meta.pop("format", None) != EXAMPLES_FORMAT:
            raise ExamplesError(f"{directory}: examples written in another format version")
        with np.load(directory / "seen.npz") as z:
            holdout_seen = SeenItems(z["holdout_indptr"], z["holdout_indices"])
            valid_seen = SeenItems(z["valid_indptr"], z["valid_indices"]) if "valid_indptr" in z else None
        with np.load(directory / "item_feats.npz") as z:
            item_feats = ItemFeatures(
                category=torch.from_numpy(z["category"]),
                genres=torch.from_numpy(z["genres"]),
                dense=torch.from_numpy(z["dense"]) if "dense" in z else None,
                text=torch.from_numpy(z["text"]) if "text" in z else None,
            )
        valid_path, refit_path = directory / "valid.npz", directory / "refit_extra.npz"
        text_path = directory / "item_text.json"
        return cls(
            train=SequenceExamples.load(directory / "train.npz"),
            holdout=SequenceExamples.load(directory / "holdout.npz"),
            vocab=Vocab.from_json((directory / "vocab.json").read_text()),
            item_feats=item_feats,
            user_feats=np.load(directory / "user_feats.npy"),
            holdout_seen=holdout_seen,
            valid=SequenceExamples.load(valid_path) if valid_path.exists() else None,
            valid_seen=valid_seen,
            meta=meta,
            item_text=json.loads(text_path.read_text()) if text_path.exists() else None,
            refit_extra=SequenceExamples.load(refit_path) if refit_path.exists() else None,
        )


# --------------------------------------------------------------------------------------------------- building


@dataclass
class _Events:
    """Events as arrays, sorted by (ts, row order); ``order`` is the position in that sort."""

    user: np.ndarray  # factorized user_id code (every user, known to the vocab or not)
    user_idx: np.ndarray  # vocab index
    item: np.ndarray
    action: np.ndarray
    ts_us: np.ndarray
    surface: np.ndarray
    context: np.ndarray
    n_dropped_unknown_items: int
    query: np.ndarray  # (n, T) token hashes, only on `search`


def _prepare_events(events: pd.DataFrame, vocab: Vocab, as_of_us: int) -> _Events:
    check_columns(events, "events")
    ts = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8
    action = action_codes(events["action"])
    surface = value_codes(events["surface"], list(SURFACES)) - 1
    if (surface < 0).any():
        bad = sorted(set(events["surface"][surface < 0].astype(str)))
        raise ContractError(f"events.surface: values outside {SURFACES}: {bad[:5]}")
    item = vocab.item_index(events["item_id"])
    keep = (ts < as_of_us) & (item > 0)
    n_unknown = int(((ts < as_of_us) & (item == 0)).sum())
    order = np.argsort(ts[keep], kind="stable")  # ties keep the table's row order
    query = events["query"].to_numpy(dtype=object)[keep][order]
    query = np.where(surface[keep][order] == SURFACES.index("search"), query, None)
    user_ids = events["user_id"].to_numpy(dtype=np.int64)[keep][order]
    return _Events(
        user=pd.factorize(user_ids)[0].astype(np.int64),
        user_idx=vocab.user_index(user_ids),
        item=item[keep][order],
        action=action[keep][order],
        ts_us=ts[keep][order],
        surface=surface[keep][order],
        context=vocab.item_index(events["context_item_id"].to_numpy()[keep][order]),
        n_dropped_unknown_items=n_unknown,
        query=encode_texts(query),
    )


class _HistoryIndex:
    """History events (non-impressions) sorted by (user, time), searchable for "everything before event t"."""

    def __init__(self, ev: _Events, strict_time: bool, spec: HistorySpec):
        self.ev, self.spec = ev, spec
        n = len(ev.ts_us)
        is_hist = np.isin(ev.action, HISTORY_CODES)
        # Within a user, rank by distinct timestamp (strict: same-ts events are not "before") or by position.
        # ev.ts_us is sorted, so the dense rank of distinct timestamps is a running count of changes.
        self.rank = np.concatenate([[0], np.cumsum(np.diff(ev.ts_us) != 0)]) if strict_time else np.arange(n)
        self.rank = self.rank.astype(np.int64)
        self.scale = np.int64(n + 1)
        h = np.flatnonzero(is_hist)
        self.h = h[np.argsort(ev.user[h], kind="stable")]  # stable: time order kept inside each user
        self.key = ev.user[self.h] * self.scale + self.rank[self.h]

    def bounds(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For target events ``t``: [start, end) into ``self.h`` of the same user's history at the target's time
        (strictly before it, at most max_history_days old: tasks/history.py)."""
        u = self.ev.user[t]
        end = np.searchsorted(self.key, u * self.scale + self.rank[t], side="left")
        start = np.searchsorted(self.key, u * self.scale, side="left")
        start = history_window(self.ev.user[self.h], self.ev.ts_us[self.h], start, end, u, self.ev.ts_us[t],
                               self.spec.max_history_days)
        return start, end

    def sequences(self, t: np.ndarray) -> SequenceExamples:
        ev, h = self.ev, self.h
        start, end = self.bounds(t)
        items, actions, gaps = history_tokens(ev.item[h], ev.action[h], ev.ts_us[h], start, end,
                                              self.spec.max_seq_len, self.spec.gap_buckets)
        return SequenceExamples(
            user_idx=ev.user_idx[t], hist_items=items, hist_actions=actions, hist_gaps=gaps,
            context_items=ev.context[t], surface=ev.surface[t], target_items=ev.item[t],
            ts=ev.ts_us[t] // 1_000_000, query=_trim(ev.query[t]),
        )

    def seen(self, t: np.ndarray) -> SeenItems:
        """Per target: the distinct items of every history event before it (not only the last L)."""
        start, end = self.bounds(t)
        return SeenItems.from_ranges(self.ev.item[self.h], start, end)


def _trim(query: np.ndarray) -> np.ndarray:
    """(n, T) -> (n, T') without the columns that are padding in every row (T' >= 1)."""
    used = np.flatnonzero((query > 0).any(axis=0))
    return query[:, : max(1, int(used[-1]) + 1 if len(used) else 1)]


def _first_per_user(user: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Of event positions ``candidates`` (sorted by time), each user's first."""
    _, first = np.unique(user[candidates], return_index=True)
    return np.sort(candidates[first])


def _last_per_user(user: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    rev = candidates[::-1]
    _, first = np.unique(user[rev], return_index=True)
    return np.sort(rev[first])


def _cap_users(t: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or len(t) <= cap:
        return t
    return np.sort(np.random.default_rng(seed).choice(t, size=cap, replace=False))


def choose_split(ev_user: np.ndarray, ev_ts_us: np.ndarray, positive: np.ndarray, as_of_us: int,
                 config: ExamplesConfig) -> tuple[str, str]:
    """-> (split, reason): ``config.split``, or for ``auto`` the split the data supports (module docstring)."""
    if config.split != "auto":
        return config.split, "configured"
    span = np.int64(config.holdout_days) * 86_400_000_000
    users = len(np.unique(ev_user[positive]))
    in_holdout = len(np.unique(ev_user[positive[ev_ts_us[positive] >= as_of_us - span]]))
    needed = max(1, min(config.auto_min_users, int(np.ceil(config.auto_min_share * users))))
    train_end = as_of_us - span * (2 if config.validation else 1)
    if not (ev_ts_us[positive] < train_end).any():
        return "leave_one_out", "the window has no positives before its validation and holdout days"
    return ("time" if in_holdout >= needed else "leave_one_out"), (
        f"{in_holdout:,} of {users:,} users have a positive in the last {config.holdout_days} day(s); the time split "
        f"needs {needed:,}")


def build_examples(
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    as_of: datetime | pd.Timestamp | str,
    config: ExamplesConfig | None = None,
) -> Examples:
    """Point-in-time train / holdout (and validation) examples from one window of contract events.

    See the module docstring for the rules. Raises ExamplesError when a split comes out empty.
    """
    config = config or ExamplesConfig()
    vocab = build_vocab(users, items)
    item_feats = item_features(items, vocab, max_genres=config.max_genres)
    user_feats = user_features(users, vocab)
    as_of_us = to_us(as_of)
    ev = _prepare_events(events, vocab, as_of_us)
    positive = np.flatnonzero(np.isin(ev.action, [ACTION_INDEX[a] for a in POSITIVE_ACTIONS]))
    split, reason = choose_split(ev.user, ev.ts_us, positive, as_of_us, config)
    valid_t = refit_t = None

    if split == "time":
        span = np.int64(config.holdout_days) * 86_400_000_000
        boundary = as_of_us - span
        holdout_t = _first_per_user(ev.user, positive[ev.ts_us[positive] >= boundary])
        train_end = boundary
        if config.validation:
            train_end = boundary - span
            in_valid = (ev.ts_us[positive] >= train_end) & (ev.ts_us[positive] < boundary)
            valid_t = _first_per_user(ev.user, positive[in_valid])
            refit_t = positive[in_valid]
        train_t = positive[ev.ts_us[positive] < train_end]
    else:
        holdout_t = _last_per_user(ev.user, positive)
        rest = np.setdiff1d(positive, holdout_t)
        if config.validation:
            valid_t = refit_t = _last_per_user(ev.user, rest)
            rest = np.setdiff1d(rest, valid_t)
        train_t = rest

    holdout_t = _cap_users(holdout_t, config.max_holdout_users, config.seed)
    if valid_t is not None:
        valid_t = _cap_users(valid_t, config.max_holdout_users, config.seed + 1)
    for name, t in (("train", train_t), ("holdout", holdout_t), ("validation", valid_t)):
        if t is not None and len(t) == 0:
            raise ExamplesError(
                f"build_examples: the {name} split is empty (split={split}, as_of={pd.Timestamp(as_of)}, "
                f"{len(ev.ts_us)} usable events, {len(positive)} positives)"
            )

    spec = HistorySpec.from_config(config)
    index = _HistoryIndex(ev, strict_time=split == "time", spec=spec)
    train = index.sequences(train_t)
    holdout = index.sequences(holdout_t)
    valid = index.sequences(valid_t) if valid_t is not None else None
    meta = {
        "split": split,
        "split_reason": reason,
        "as_of": str(pd.Timestamp(as_of_us, unit="us", tz="UTC")),
        "max_seq_len": spec.max_seq_len,
        "gap_buckets": spec.gap_buckets,
        "max_history_days": spec.max_history_days,
        "n_events": int(len(ev.ts_us)),
        "n_dropped_unknown_items": ev.n_dropped_unknown_items,
        "n_train": len(train),
        "n_holdout": len(holdout),
        "n_valid": 0 if valid is None else len(valid),
        "n_refit_extra": 0 if refit_t is None else len(refit_t),
    }
    return Examples(
        train=train,
        holdout=holdout,
        vocab=vocab,
        item_feats=item_feats,
        user_feats=user_feats,
        holdout_seen=index.seen(holdout_t),
        valid=valid,
        valid_seen=index.seen(valid_t) if valid_t is not None else None,
        meta=meta,
        item_text=_item_text_rows(items, vocab),
        refit_extra=index.sequences(refit_t) if refit_t is not None else None,
    )


def _item_text_rows(items: pd.DataFrame, vocab: Vocab) -> list[str]:
    """Row i = the text of item index i (tasks/vocabulary.py item_text), "" for padding and unknown items."""
    out = np.full(vocab.n_items + 1, "", dtype=object)
    idx = vocab.item_index(items["item_id"])
    out[idx[idx > 0]] = item_text(items.loc[idx > 0]).to_numpy()
    return [str(t) for t in out]
