"""Point-in-time training examples: user sequences, a time (or leave-one-out) split, and the catalog features.

One example = one positive action (click / save / conversion) of a user: the target. Its inputs are what was known
strictly before it:

- history: the user's last L actions before the target, positive AND negative (skip / hide), as TransAct does.
  Impressions are left out: they are an order of magnitude more numerous than actions, carry no preference on their
  own, and would push every real action out of a short window.
- gap: the time between each history action and the target, bucketed by ``gap_bucket`` (2 octaves of seconds per
  bucket, so 16 buckets cover one second to years).
- context: the event's ``context_item_id`` (the viewed item on ``related``; 0 when none) and its surface.

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

With ``validation=True`` a validation split for early stopping is cut the same way just before the holdout (the
``holdout_days`` before it, or each user's second-to-last positive), so the holdout stays untouched by model
selection. The holdout is capped at ``max_holdout_users`` users, sampled with ``seed``.

Events at or after ``as_of`` and events on items missing from the catalog are dropped; users missing from the users
table get user index 0 (unknown demographics).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from towerflow.config import ExamplesConfig
from towerflow.contract import (
    ACTIONS,
    NEGATIVE_ACTIONS,
    POSITIVE_ACTIONS,
    SURFACES,
    ContractError,
    check_columns,
    demographic_columns,
)
from towerflow.errors import TowerflowError
from towerflow.models.batch import Batch, FeatureSizes, ItemFeatures

ACTION_INDEX: dict[str, int] = {a: i + 1 for i, a in enumerate(ACTIONS)}  # 0 = padding (models/batch.py)
SURFACE_INDEX: dict[str, int] = {s: i for i, s in enumerate(SURFACES)}
HISTORY_ACTIONS: tuple[str, ...] = POSITIVE_ACTIONS + NEGATIVE_ACTIONS  # impressions excluded (module docstring)
EXAMPLES_FORMAT = 1


class ExamplesError(TowerflowError):
    """Examples cannot be built or loaded; the message names the reason (empty split, missing file...)."""


# --------------------------------------------------------------------------------------------------- vocabulary


def _lookup(sorted_ids: np.ndarray, ids) -> np.ndarray:
    """Index (1-based) of each id in ``sorted_ids``; 0 for unknown or null ids."""
    vals = pd.array(ids, dtype="Int64").to_numpy(dtype=np.int64, na_value=np.iinfo(np.int64).min)
    if len(sorted_ids) == 0:
        return np.zeros(len(vals), dtype=np.int64)
    pos = np.searchsorted(sorted_ids, vals)
    found = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == vals)
    return np.where(found, pos + 1, 0).astype(np.int64)


@dataclass
class Vocab:
    """Id <-> index maps. Item index i + 1 <-> ``item_ids[i]`` (0 = padding / unknown); same for users.

    Category, genre and demographic value j + 1 <-> ``categories[j]`` etc. (0 = unknown).
    """

    item_ids: np.ndarray  # (n_items,) int64, sorted, unique
    user_ids: np.ndarray  # (n_users,) int64, sorted, unique
    categories: list[str]
    genres: list[str]
    demographic_fields: list[str]
    demographic_values: list[list[str]]  # per field, its values

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self.user_ids = np.asarray(self.user_ids, dtype=np.int64)
        for name, ids in (("item_ids", self.item_ids), ("user_ids", self.user_ids)):
            if len(ids) > 1 and not (np.diff(ids) > 0).all():
                raise ExamplesError(f"Vocab.{name} must be sorted and unique")
        if len(self.demographic_fields) != len(self.demographic_values):
            raise ExamplesError("Vocab: one value list per demographic field")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def item_index(self, ids) -> np.ndarray:
        """(n,) int64 item indices of ``ids``; 0 for unknown or null ids."""
        return _lookup(self.item_ids, ids)

    def user_index(self, ids) -> np.ndarray:
        """(n,) int64 user indices of ``ids``; 0 for unknown or null ids."""
        return _lookup(self.user_ids, ids)

    def to_json(self) -> str:
        d = asdict(self)
        d["item_ids"] = self.item_ids.tolist()
        d["user_ids"] = self.user_ids.tolist()
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        d = json.loads(text)
        return cls(**d)


def _sorted_strings(values: pd.Series) -> list[str]:
    return sorted(values.dropna().astype("str").unique().tolist())


def build_vocab(users: pd.DataFrame, items: pd.DataFrame) -> Vocab:
    """The vocabulary of a catalog and user table (contract columns; extra user columns are demographics)."""
    check_columns(users, "users")
    check_columns(items, "items")
    for table, df, col in (("users", users, "user_id"), ("items", items, "item_id")):
        if df[col].duplicated().any():
            dup = df.loc[df[col].duplicated(), col].iloc[0]
            raise ContractError(f"{table}: duplicate {col} {dup}")
    genres = items["genres"].dropna().astype(str).str.split("|").explode()
    fields_ = demographic_columns(users)
    return Vocab(
        item_ids=np.sort(items["item_id"].to_numpy(dtype=np.int64)),
        user_ids=np.sort(users["user_id"].to_numpy(dtype=np.int64)),
        categories=_sorted_strings(items["category"]),
        genres=[g for g in _sorted_strings(genres) if g],
        demographic_fields=fields_,
        demographic_values=[_sorted_strings(users[f]) for f in fields_],
    )


def _codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """1-based codes of ``values`` in ``categories``; 0 for null or unknown."""
    # astype("str") keeps nulls null (pandas 3), and spells values exactly as _sorted_strings does
    return pd.Categorical(values.astype("str"), categories=categories).codes.astype(np.int64) + 1


def item_features(items: pd.DataFrame, vocab: Vocab, max_genres: int = 4) -> ItemFeatures:
    """Catalog features, row i = item index i (row 0 = padding, all zeros).

    category (n+1,) long; genres (n+1, max_genres) long, 0-padded; dense (n+1, D) float32 from the optional
    ``features`` list column (missing rows are zeros), or None when the catalog has no dense features.
    """
    n = vocab.n_items
    idx = vocab.item_index(items["item_id"])
    known = idx > 0
    items, idx = items.loc[known], idx[known]
    category = np.zeros(n + 1, dtype=np.int64)
    category[idx] = _codes(items["category"], vocab.categories)

    genres = np.zeros((n + 1, max_genres), dtype=np.int64)
    split = items["genres"].astype(object).where(items["genres"].notna(), "").astype(str).str.split("|")
    exploded = pd.DataFrame({"row": idx}).assign(g=split.to_numpy()).explode("g")
    exploded = exploded[exploded["g"].notna() & (exploded["g"] != "")]
    codes = _codes(exploded["g"], vocab.genres)
    slot = exploded.groupby("row").cumcount().to_numpy()
    keep = (slot < max_genres) & (codes > 0)
    genres[exploded["row"].to_numpy()[keep], slot[keep]] = codes[keep]

    dense = None
    if "features" in items.columns and items["features"].notna().any():
        present = items["features"].notna().to_numpy()
        rows = [np.asarray(v, dtype=np.float32) for v in items["features"].to_numpy()[present]]
        dims = {r.shape for r in rows}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ContractError(f"items.features: every vector must have the same length; got shapes {sorted(dims)}")
        dense = np.zeros((n + 1, rows[0].shape[0]), dtype=np.float32)
        dense[idx[present]] = np.stack(rows)
        if not np.isfinite(dense).all():
            raise ContractError("items.features: NaN or infinite values")
    return ItemFeatures(
        category=torch.from_numpy(category),
        genres=torch.from_numpy(genres),
        dense=None if dense is None else torch.from_numpy(dense),
    )


def user_features(users: pd.DataFrame, vocab: Vocab) -> np.ndarray:
    """(n_users + 1, F) int64 demographic value indices, row 0 = unknown user, 0 = unknown value."""
    out = np.zeros((vocab.n_users + 1, len(vocab.demographic_fields)), dtype=np.int64)
    idx = vocab.user_index(users["user_id"])
    known = idx > 0
    for j, (f, values) in enumerate(zip(vocab.demographic_fields, vocab.demographic_values, strict=True)):
        col = users[f] if f in users.columns else pd.Series([None] * len(users), index=users.index)
        out[idx[known], j] = _codes(col, values)[known]
    return out


def feature_sizes(vocab: Vocab, item_feats: ItemFeatures) -> FeatureSizes:
    """Table sizes for the towers."""
    return FeatureSizes(
        n_items=vocab.n_items,
        n_categories=len(vocab.categories),
        n_genres=len(vocab.genres),
        dense_dim=0 if item_feats.dense is None else int(item_feats.dense.shape[1]),
        demographic_cardinalities=tuple(len(v) for v in vocab.demographic_values),
    )


def gap_bucket(gap_seconds: np.ndarray, n_buckets: int) -> np.ndarray:
    """Time-gap bucket of non-negative gaps in seconds: ``1 + floor(log2(1 + s) / 2)``, capped at n_buckets - 1.

    Two octaves per bucket: 1 = under 3 s, 2 = under 15 s, 4 = under 4 min, 6 = under 4.5 h, 8 = under 3 days,
    10 = under 48 days, ... Bucket 0 is padding. ``n_buckets`` must equal ``ModelConfig.gap_buckets``.
    """
    s = np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0.0)
    return (1 + np.minimum(np.floor(np.log2(1.0 + s) / 2.0), n_buckets - 2)).astype(np.int64)


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

    def __post_init__(self) -> None:
        n = len(self.user_idx)
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
        )

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, **{fl.name: getattr(self, fl.name) for fl in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> SequenceExamples:
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})

    @classmethod
    def empty(cls, max_seq_len: int) -> SequenceExamples:
        e = np.zeros(0, dtype=np.int64)
        h = np.zeros((0, max_seq_len), dtype=np.int64)
        return cls(e, h, h.copy(), h.copy(), e.copy(), e.copy(), e.copy(), e.copy())


@dataclass
class SeenItems:
    """Per-row item indices (CSR): row r's items are ``indices[indptr[r]:indptr[r + 1]]``, sorted, unique."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int64

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.indptr[r] : self.indptr[r + 1]]

    @classmethod
    def from_lists(cls, rows: list) -> SeenItems:
        rows = [np.unique(np.asarray(r, dtype=np.int64)) for r in rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r) for r in rows])
        indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return cls(indptr, indices.astype(np.int64))

    def take(self, idx) -> SeenItems:
        """The rows ``idx`` (an index array or boolean mask) as a new object."""
        idx = np.arange(len(self))[idx]
        lengths = self.indptr[idx + 1] - self.indptr[idx]
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(lengths)
        offsets = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)
        return SeenItems(indptr, self.indices[np.repeat(self.indptr[idx], lengths) + offsets])


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
            seen = {"holdout_indptr": self.holdout_seen.indptr, "holdout_indices": self.holdout_seen.indices}
            if self.valid_seen is not None:
                seen |= {"valid_indptr": self.valid_seen.indptr, "valid_indices": self.valid_seen.indices}
            np.savez(tmp / "seen.npz", **seen)
            feats = {"category": self.item_feats.category.numpy(), "genres": self.item_feats.genres.numpy()}
            if self.item_feats.dense is not None:
                feats["dense"] = self.item_feats.dense.numpy()
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
            )
        valid_path = directory / "valid.npz"
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


def _timestamp_us(ts) -> int:
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return int(t.value) // 1000  # .value is nanoseconds whatever the unit


def _prepare_events(events: pd.DataFrame, vocab: Vocab, as_of_us: int) -> _Events:
    check_columns(events, "events")
    ts = pd.DatetimeIndex(pd.to_datetime(events["ts"], utc=True)).as_unit("us").asi8
    action = _codes(events["action"], list(ACTIONS))
    if (action == 0).any():
        bad = sorted(set(events["action"][action == 0].astype(str)))
        raise ContractError(f"events.action: values outside {ACTIONS}: {bad[:5]}")
    surface = _codes(events["surface"], list(SURFACES)) - 1
    if (surface < 0).any():
        bad = sorted(set(events["surface"][surface < 0].astype(str)))
        raise ContractError(f"events.surface: values outside {SURFACES}: {bad[:5]}")
    item = vocab.item_index(events["item_id"])
    keep = (ts < as_of_us) & (item > 0)
    n_unknown = int(((ts < as_of_us) & (item == 0)).sum())
    order = np.argsort(ts[keep], kind="stable")  # ties keep the table's row order
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
    )


class _HistoryIndex:
    """History events (non-impressions) sorted by (user, time), searchable for "everything before event t"."""

    def __init__(self, ev: _Events, strict_time: bool):
        self.ev = ev
        n = len(ev.ts_us)
        is_hist = np.isin(ev.action, [ACTION_INDEX[a] for a in HISTORY_ACTIONS])
        # Within a user, rank by distinct timestamp (strict: same-ts events are not "before") or by position.
        # ev.ts_us is sorted, so the dense rank of distinct timestamps is a running count of changes.
        self.rank = np.concatenate([[0], np.cumsum(np.diff(ev.ts_us) != 0)]) if strict_time else np.arange(n)
        self.rank = self.rank.astype(np.int64)
        self.scale = np.int64(n + 1)
        h = np.flatnonzero(is_hist)
        self.h = h[np.argsort(ev.user[h], kind="stable")]  # stable: time order kept inside each user
        self.key = ev.user[self.h] * self.scale + self.rank[self.h]

    def bounds(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For target events ``t``: [start, end) into ``self.h`` of the same user's history strictly before."""
        u = self.ev.user[t]
        end = np.searchsorted(self.key, u * self.scale + self.rank[t], side="left")
        start = np.searchsorted(self.key, u * self.scale, side="left")
        return start, end

    def sequences(self, t: np.ndarray, max_len: int, n_buckets: int) -> SequenceExamples:
        ev = self.ev
        start, end = self.bounds(t)
        pos = end[:, None] - max_len + np.arange(max_len)[None, :]  # (n, L), last column = latest
        real = pos >= start[:, None]
        src = self.h[np.clip(pos, 0, max(len(self.h) - 1, 0))] if len(self.h) else np.zeros_like(pos)
        gap_s = (ev.ts_us[t][:, None] - ev.ts_us[src]) / 1e6
        return SequenceExamples(
            user_idx=ev.user_idx[t],
            hist_items=np.where(real, ev.item[src], 0),
            hist_actions=np.where(real, ev.action[src], 0),
            hist_gaps=np.where(real, gap_bucket(gap_s, n_buckets), 0),
            context_items=ev.context[t],
            surface=ev.surface[t],
            target_items=ev.item[t],
            ts=ev.ts_us[t] // 1_000_000,
        )

    def seen(self, t: np.ndarray) -> SeenItems:
        """Per target: the distinct items of every history event before it (not only the last L)."""
        start, end = self.bounds(t)
        lengths = end - start
        rows = np.repeat(np.arange(len(t)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        items = self.ev.item[self.h[np.repeat(start, lengths) + offsets]]
        scale = np.int64(self.ev.item.max(initial=0) + 1)
        pairs = np.unique(rows * scale + items)
        r, i = pairs // scale, pairs % scale
        indptr = np.zeros(len(t) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(np.bincount(r, minlength=len(t)))
        return SeenItems(indptr, i.astype(np.int64))


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


def build_examples(
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    as_of: datetime | pd.Timestamp | str,
    config: ExamplesConfig | None = None,
) -> Examples:
    """Point-in-time train / holdout (and optional validation) examples from one window of contract events.

    See the module docstring for the rules. Raises ExamplesError when a split comes out empty.
    """
    config = config or ExamplesConfig()
    vocab = build_vocab(users, items)
    item_feats = item_features(items, vocab, max_genres=config.max_genres)
    user_feats = user_features(users, vocab)
    as_of_us = _timestamp_us(as_of)
    ev = _prepare_events(events, vocab, as_of_us)
    positive = np.flatnonzero(np.isin(ev.action, [ACTION_INDEX[a] for a in POSITIVE_ACTIONS]))
    valid_t = None

    if config.split == "time":
        span = np.int64(config.holdout_days) * 86_400_000_000
        boundary = as_of_us - span
        holdout_t = _first_per_user(ev.user, positive[ev.ts_us[positive] >= boundary])
        train_end = boundary
        if config.validation:
            train_end = boundary - span
            in_valid = (ev.ts_us[positive] >= train_end) & (ev.ts_us[positive] < boundary)
            valid_t = _first_per_user(ev.user, positive[in_valid])
        train_t = positive[ev.ts_us[positive] < train_end]
    else:
        holdout_t = _last_per_user(ev.user, positive)
        rest = np.setdiff1d(positive, holdout_t)
        if config.validation:
            valid_t = _last_per_user(ev.user, rest)
            rest = np.setdiff1d(rest, valid_t)
        train_t = rest

    holdout_t = _cap_users(holdout_t, config.max_holdout_users, config.seed)
    if valid_t is not None:
        valid_t = _cap_users(valid_t, config.max_holdout_users, config.seed + 1)
    for name, t in (("train", train_t), ("holdout", holdout_t), ("validation", valid_t)):
        if t is not None and len(t) == 0:
            raise ExamplesError(
                f"build_examples: the {name} split is empty (split={config.split}, as_of={pd.Timestamp(as_of)}, "
                f"{len(ev.ts_us)} usable events, {len(positive)} positives)"
            )

    index = _HistoryIndex(ev, strict_time=config.split == "time")
    L, nb = config.max_seq_len, config.gap_buckets
    train = index.sequences(train_t, L, nb)
    holdout = index.sequences(holdout_t, L, nb)
    valid = index.sequences(valid_t, L, nb) if valid_t is not None else None
    meta = {
        "split": config.split,
        "as_of": str(pd.Timestamp(as_of_us, unit="us", tz="UTC")),
        "max_seq_len": L,
        "gap_buckets": nb,
        "n_events": int(len(ev.ts_us)),
        "n_dropped_unknown_items": ev.n_dropped_unknown_items,
        "n_train": len(train),
        "n_holdout": len(holdout),
        "n_valid": 0 if valid is None else len(valid),
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
    )
