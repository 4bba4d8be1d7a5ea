"""The vocabulary of one window: item and user id <-> index maps, and the catalog and profile feature tables.

Item index i + 1 <-> ``Vocab.item_ids[i]``, 0 = padding / unknown (models/batch.py states the conventions); the
same for users. Training (tasks/build_examples.py) builds it from a snapshot; a release stores it (``vocab/``) and
serving maps request ids through it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from towerflow.contract import ContractError, check_columns, demographic_columns
from towerflow.errors import TowerflowError
from towerflow.models.batch import FeatureSizes, ItemFeatures
from towerflow.models.query import encode_texts


class VocabError(TowerflowError):
    """A vocabulary is malformed (ids not sorted and unique, value lists not one per field)."""


def _lookup(sorted_ids: np.ndarray, ids) -> np.ndarray:
    """Index (1-based) of each id in ``sorted_ids``; 0 for unknown or null ids."""
    if isinstance(ids, np.ndarray) and ids.dtype == np.int64:
        vals = ids  # the request path: ids without nulls, no conversion
    else:
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
                raise VocabError(f"Vocab.{name} must be sorted and unique")
        if len(self.demographic_fields) != len(self.demographic_values):
            raise VocabError("Vocab: one value list per demographic field")

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


def value_codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """1-based codes of ``values`` in ``categories``; 0 for null or unknown."""
    # astype("str") keeps nulls null (pandas 3), and spells values exactly as _sorted_strings does
    return pd.Categorical(values.astype("str"), categories=categories).codes.astype(np.int64) + 1


def item_features(items: pd.DataFrame, vocab: Vocab, max_genres: int = 4) -> ItemFeatures:
    """Catalog features, row i = item index i (row 0 = padding, all zeros).

    category (n+1,) long; genres (n+1, max_genres) long, 0-padded; dense (n+1, D) float32 from the optional
    ``features`` list column (missing rows are zeros), or None when the catalog has no dense features;
    text (n+1, T) long token hashes of ``item_text`` (models/query.py), the words a search query meets.
    """
    n = vocab.n_items
    idx = vocab.item_index(items["item_id"])
    known = idx > 0
    items, idx = items.loc[known], idx[known]
    category = np.zeros(n + 1, dtype=np.int64)
    category[idx] = value_codes(items["category"], vocab.categories)

    genres = np.zeros((n + 1, max_genres), dtype=np.int64)
    split = items["genres"].astype(object).where(items["genres"].notna(), "").astype(str).str.split("|")
    exploded = pd.DataFrame({"row": idx}).assign(g=split.to_numpy()).explode("g")
    exploded = exploded[exploded["g"].notna() & (exploded["g"] != "")]
    codes = value_codes(exploded["g"], vocab.genres)
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
    text = np.zeros(n + 1, dtype=object)
    text[idx] = item_text(items).to_numpy()
    return ItemFeatures(
        category=torch.from_numpy(category),
        genres=torch.from_numpy(genres),
        dense=None if dense is None else torch.from_numpy(dense),
        text=torch.from_numpy(encode_texts(text)),
    )


def item_text(items: pd.DataFrame) -> pd.Series:
    """An item's text for the query tokenizer: its title (when present) and its category, e.g. 'Kalo ven no. 3 topic_01'."""
    title = items["title"].astype(object).where(items["title"].notna(), "") if "title" in items else ""
    return (title + " " + items["category"].astype(str)).str.strip()


def user_features(users: pd.DataFrame, vocab: Vocab) -> np.ndarray:
    """(n_users + 1, F) int64 demographic value indices, row 0 = unknown user, 0 = unknown value."""
    out = np.zeros((vocab.n_users + 1, len(vocab.demographic_fields)), dtype=np.int64)
    idx = vocab.user_index(users["user_id"])
    known = idx > 0
    for j, (f, values) in enumerate(zip(vocab.demographic_fields, vocab.demographic_values, strict=True)):
        col = users[f] if f in users.columns else pd.Series([None] * len(users), index=users.index)
        out[idx[known], j] = value_codes(col, values)[known]
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
