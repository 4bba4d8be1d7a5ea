"""The retrieval path serving uses: user vectors from a release's user tower, searched in the SAME release's index.

``answer`` is the one function that turns encoded requests into ``{release, items: [{item_id, score}]}``; the
release gate calls it on sample queries before promotion, and the service calls it for every request (with the
history states ``h`` it already has), so what is gated is what serves. The user vector is always
``combine(encode_history(history), context)``: the split the hybrid service relies on, so a stored ``h`` and an
``h`` computed from events go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from towerflow.infra.releases import LoadedRelease
from towerflow.models.batch import Batch


def context_batch(context_items: torch.Tensor, surface: torch.Tensor, user_feats: torch.Tensor) -> Batch:
    """A Batch for requests whose history states ``h`` are already known: (b,) (b,) (b, F) -> Batch.

    Its history fields are a single padding slot (an empty history); ``answer(..., h=h)`` does not read them.
    """
    b = len(context_items)
    empty = torch.zeros((b, 1), dtype=torch.long)
    return Batch(hist_items=empty, hist_actions=empty, hist_gaps=empty, context_items=context_items,
                 surface=surface, user_feats=user_feats, target_items=torch.zeros(b, dtype=torch.long))


@torch.inference_mode()
def encode_histories(release: LoadedRelease, batch: Batch, item_table: torch.Tensor | None = None) -> torch.Tensor:
    """The offline half: the batch's histories (b, L) -> h (b, history_dim) with the release's user tower.

    ``item_table`` (n_items + 1, d): the item tower's vectors of every item index (``ServingBundle.item_table``,
    read from the release's item embeddings) so the history items are looked up instead of re-embedded.
    """
    _eval(release)
    hist_vecs = None if item_table is None else item_table[batch.hist_items]  # (b, L, d)
    return release.model.user_tower.encode_history(batch.hist_items, batch.hist_actions, batch.hist_gaps, hist_vecs)


@torch.inference_mode()
def user_vectors(release: LoadedRelease, batch: Batch, h: torch.Tensor | None = None,
                 item_table: torch.Tensor | None = None) -> np.ndarray:
    """The online half: combine h (b, history_dim) with the batch's context -> u (b, d) float32.

    ``h`` None: encode the batch's histories first (the full online path). ``item_table``: as in encode_histories.
    """
    _eval(release)
    if h is None:
        h = encode_histories(release, batch, item_table)
    context_vecs = None if item_table is None else item_table[batch.context_items]  # (b, d)
    u = release.model.user_tower.combine(h, batch.context_items, batch.surface, batch.user_feats, context_vecs)
    return u.cpu().numpy().astype(np.float32, copy=False)


def search(release: LoadedRelease, u: np.ndarray, k: int, exclude: Sequence[set[int]] | None = None) -> list[dict]:
    """u (b, d) -> b responses naming ``release``: its index's top k item ids by inner product, minus ``exclude[i]``.

    Searches k + |exclude| so that dropping excluded items still leaves k answers when the catalog allows.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    exclude = exclude or [set() for _ in range(len(u))]
    depth = min(k + max((len(e) for e in exclude), default=0), len(release.item_ids))
    scores, ids = release.search(u, depth)
    out = []
    for row_scores, row_ids, ex in zip(scores, ids, exclude, strict=True):
        keep = [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0 and int(i) not in ex]
        out.append({"release": release.release_id,
                    "items": [{"item_id": i, "score": s} for i, s in keep[:k]]})
    return out


def answer(release: LoadedRelease, batch: Batch, k: int, exclude: Sequence[set[int]] | None = None,
           h: torch.Tensor | None = None, item_table: torch.Tensor | None = None) -> list[dict]:
    """b encoded requests -> b responses naming ``release``; ``exclude[i]`` holds item ids request i must not get.

    ``h`` (b, history_dim): history states already computed by this release's tower (the hybrid path); the
    batch's history fields are then not read. ``item_table``: see encode_histories.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return search(release, user_vectors(release, batch, h, item_table), k, exclude)


def _eval(release: LoadedRelease) -> None:
    if release.model.training:  # a loaded model is in eval mode already; don't walk its modules every request
        release.model.eval()
