"""The tensors that cross the boundary between example building (tasks/) and the towers (models/).

Index conventions (shared by every stage):

- item index 0 is padding / "no item"; real items are 1..n_items (``Vocab`` in tasks/build_examples.py maps ids).
- action ids: 0 padding, then 1 + position in ``towerflow.contract.ACTIONS``.
- surface ids: position in ``towerflow.contract.SURFACES``.
- category / genre / demographic value ids: 0 unknown, then 1..cardinality.
- histories are left-padded: the latest action is in the last column.
- texts (search queries, item titles + categories) are token hashes (models/query.py), left-aligned, 0-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from towerflow.contract import ACTIONS, POSITIVE_ACTIONS, SURFACES

N_ACTIONS = len(ACTIONS) + 1  # + padding
POSITIVE_ACTION_IDS: tuple[int, ...] = tuple(1 + ACTIONS.index(a) for a in POSITIVE_ACTIONS)
N_SURFACES = len(SURFACES)


@dataclass
class FeatureSizes:
    """Vocabulary sizes the towers need to build their embedding tables."""

    n_items: int  # real items; tables have n_items + 1 rows
    n_categories: int
    n_genres: int
    dense_dim: int  # 0 when items have no dense features
    demographic_cardinalities: tuple[int, ...]  # one per user profile field


@dataclass
class ItemFeatures:
    """Catalog-side features; row i describes item index i (row 0 = padding)."""

    category: torch.Tensor  # (n + 1,) long
    genres: torch.Tensor  # (n + 1, G) long, padded with 0
    dense: torch.Tensor | None = None  # (n + 1, D) float
    text: torch.Tensor | None = None  # (n + 1, T) long token hashes of title + category (models/query.py)


@dataclass
class Batch:
    """One training or scoring batch of b examples with histories of length L."""

    hist_items: torch.Tensor  # (b, L) long
    hist_actions: torch.Tensor  # (b, L) long
    hist_gaps: torch.Tensor  # (b, L) long, time-gap bucket of (example time - action time)
    context_items: torch.Tensor  # (b,) long, 0 = no context
    surface: torch.Tensor  # (b,) long
    user_feats: torch.Tensor  # (b, F) long
    target_items: torch.Tensor  # (b,) long; 0 when scoring without a target
    query: torch.Tensor | None = None  # (b, T) long token hashes of the search query; None or all 0 = no query

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v if v is None else v.to(device) for k, v in moved.items()})

    def __len__(self) -> int:
        return self.hist_items.shape[0]
