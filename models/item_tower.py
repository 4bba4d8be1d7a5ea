"""The item tower: id + category + genre bag + optional dense features + text bag -> MLP -> unit vector.

With ``use_query`` the items' title + category tokens (models/query.py) are embedded by ``text_encoder``, the bag
the user tower also reads the search query with: a query and an item's text meet in one space.

Id-less items (index 0, or an index past the trained id table, i.e. an item added to the catalog after training)
get their vector from their features alone; training drops the id embedding now and then (``id_dropout``) so that
feature-only vectors land in the same space as the learned ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from towerflow.config import ModelConfig
from towerflow.errors import TowerflowError
from towerflow.models.batch import FeatureSizes, ItemFeatures
from towerflow.models.layers import mlp
from towerflow.models.query import QueryEncoder


class FeatureTableError(TowerflowError, ValueError):
    """An item feature table does not fit the tower (wrong shape, dtype or a value outside a vocabulary)."""


def check_features(features: ItemFeatures, sizes: FeatureSizes) -> ItemFeatures:
    """Validate ``features`` against ``sizes`` -> the same table as contiguous long / float tensors.

    Raises FeatureTableError naming the field and the problem. A table may have more rows than
    ``sizes.n_items + 1`` (a catalog grown since training); category and genre values must be in the trained
    vocabularies (0 = unknown).
    """
    cat, genres, dense = features.category, features.genres, features.dense
    if cat.dim() != 1:
        raise FeatureTableError(f"item features: category must be (n + 1,), got shape {tuple(cat.shape)}")
    n_rows = cat.shape[0]
    if n_rows < 1:
        raise FeatureTableError("item features: the table needs at least row 0 (padding)")
    if genres.dim() != 2 or genres.shape[0] != n_rows:
        raise FeatureTableError(
            f"item features: genres must be ({n_rows}, G), got shape {tuple(genres.shape)}"
        )
    for name, t, card in (("category", cat, sizes.n_categories), ("genres", genres, sizes.n_genres)):
        if t.dtype not in (torch.int64, torch.int32):
            raise FeatureTableError(f"item features: {name} must be an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > card):
            raise FeatureTableError(
                f"item features: {name} values must be in [0, {card}] (0 = unknown), "
                f"got [{int(t.min())}, {int(t.max())}]"
            )
    if genres.shape[1] == 0:  # an empty bag per item keeps one code path
        genres = torch.zeros(n_rows, 1, dtype=torch.long)
    if sizes.dense_dim > 0:
        if dense is None or tuple(dense.shape) != (n_rows, sizes.dense_dim):
            got = None if dense is None else tuple(dense.shape)
            raise FeatureTableError(f"item features: dense must be ({n_rows}, {sizes.dense_dim}), got {got}")
        if not torch.isfinite(dense).all():
            raise FeatureTableError("item features: dense contains NaN or inf")
        dense = dense.float().contiguous()
    elif dense is not None and dense.numel():
        raise FeatureTableError(
            f"item features: dense given with shape {tuple(dense.shape)} but dense_dim is 0"
        )
    else:
        dense = None
    text = features.text
    if text is not None:
        if text.dim() != 2 or text.shape[0] != n_rows or text.dtype not in (torch.int64, torch.int32):
            raise FeatureTableError(
                f"item features: text must be ({n_rows}, T) integer token hashes, got {tuple(text.shape)} {text.dtype}"
            )
        if text.numel() and int(text.min()) < 0:
            raise FeatureTableError("item features: text token hashes must be >= 0 (0 = padding)")
        text = text.long().contiguous()
    return ItemFeatures(category=cat.long().contiguous(), genres=genres.long().contiguous(), dense=dense, text=text)


class ItemTower(nn.Module):
    """Maps item indices to L2-normalised vectors.

    The feature table is held in buffers (``category``, ``genres``, ``dense``) so ``forward`` takes indices only
    and the table is saved in the state dict; ``set_features`` swaps in a bigger table for a grown catalog.
    """

    def __init__(self, sizes: FeatureSizes, features: ItemFeatures, cfg: ModelConfig):
        super().__init__()
        self.sizes, self.cfg = sizes, cfg
        d = cfg.d_model
        self.n_id_rows = sizes.n_items + 1  # indices >= this have no trained id embedding
        self.id_emb = nn.Embedding(self.n_id_rows, d, padding_idx=0)
        self.category_emb = nn.Embedding(sizes.n_categories + 1, d, padding_idx=0)
        self.genre_bag = nn.EmbeddingBag(sizes.n_genres + 1, d, mode="mean", padding_idx=0)
        self.dense_proj = nn.Linear(sizes.dense_dim, d) if sizes.dense_dim > 0 else None
        self.text_encoder = QueryEncoder(cfg.query_buckets, d) if cfg.use_query else None
        n_parts = 3 + (self.dense_proj is not None) + (self.text_encoder is not None)
        self.mlp = mlp(n_parts * d, cfg.hidden, cfg.dim, cfg.dropout)
        self.register_buffer("category", torch.empty(0, dtype=torch.long))
        self.register_buffer("genres", torch.empty(0, 1, dtype=torch.long))
        self.register_buffer("dense", None)
        self.register_buffer("text", None)
        self.set_features(features)

    @property
    def n_rows(self) -> int:
        """Rows in the current feature table (padding row 0 included)."""
        return self.category.shape[0]

    def set_features(self, features: ItemFeatures) -> None:
        """Replace the feature table in place (e.g. with the catalog as of serving time).

        Rows 1..sizes.n_items must describe the same items as at training time; rows beyond are new items and
        are embedded from their features only.
        """
        f = check_features(features, self.sizes)
        device = self.id_emb.weight.device
        self.category = f.category.to(device)
        self.genres = f.genres.to(device)
        self.dense = None if f.dense is None else f.dense.to(device)
        if self.text_encoder is not None:
            # a catalog without titles still gets a (empty) text bag per item: the tower's input stays one shape
            text = f.text if f.text is not None else torch.zeros(f.category.shape[0], 1, dtype=torch.long)
            self.text = text.to(device)

    def embed_features(
        self,
        category: torch.Tensor,
        genres: torch.Tensor,
        dense: torch.Tensor | None = None,
        item_idx: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Vectors from explicit features: category (n,), genres (n, G), dense (n, D), text (n, T) -> (n, dim).

        ``item_idx`` (n,) selects id embeddings; None, 0 or an index past the trained id table means "no id".
        In training mode each item's id is dropped with probability ``cfg.id_dropout``.
        """
        parts = [self._id_part(item_idx, category.shape[0], category.device)]
        parts.append(self.category_emb(category))  # (n, d)
        parts.append(self.genre_bag(genres))  # (n, d): mean over non-zero genres, 0 for an empty bag
        if self.dense_proj is not None:
            if dense is None:
                raise FeatureTableError(
                    f"item features: this tower needs dense features of size {self.sizes.dense_dim}"
                )
            parts.append(self.dense_proj(dense))
        if self.text_encoder is not None:
            if text is None:
                text = torch.zeros(category.shape[0], 1, dtype=torch.long, device=category.device)
            parts.append(self.text_encoder(text))  # (n, d), 0 for an item without text
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)

    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        """item_idx (...) long, rows of the feature table -> (..., dim) unit vectors.

        Cost is per element: callers with repeated indices should pass unique ones and gather
        (TwoTower does).
        """
        if item_idx.numel() and (int(item_idx.min()) < 0 or int(item_idx.max()) >= self.n_rows):
            raise FeatureTableError(
                f"item indices [{int(item_idx.min())}, {int(item_idx.max())}] are outside the feature table "
                f"({self.n_rows} rows); call set_features with the current catalog"
            )
        flat = item_idx.reshape(-1)
        dense = None if self.dense is None else self.dense[flat]
        text = None if self.text is None else self.text[flat]
        out = self.embed_features(self.category[flat], self.genres[flat], dense, flat, text)
        return out.reshape(*item_idx.shape, -1)

    def _id_part(self, item_idx: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        d = self.id_emb.embedding_dim
        if item_idx is None:
            return torch.zeros(n, d, device=device)
        known = (item_idx > 0) & (item_idx < self.n_id_rows)
        if self.training and self.cfg.id_dropout > 0:
            known = known & (torch.rand(known.shape, device=device) >= self.cfg.id_dropout)
        # Row 0 of the table is a zero padding row: routing unknown ids there zeros their id part.
        return self.id_emb(torch.where(known, item_idx, torch.zeros_like(item_idx)))
