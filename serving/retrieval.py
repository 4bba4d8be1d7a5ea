"""The retrieval path serving uses: user vectors from a release's user tower, searched in the SAME release's index.

``answer`` is the one function that turns encoded requests into ``{release, items: [{item_id, score}]}``; the
release gate calls it on sample queries before promotion, so what is gated is what will serve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from infra.releases import LoadedRelease
from models.batch import Batch


@torch.no_grad()
def answer(release: LoadedRelease, batch: Batch, k: int, exclude: Sequence[set[int]] | None = None) -> list[dict]:
    """b encoded requests -> b responses naming ``release``; ``exclude[i]`` holds item ids request i must not get.

    Searches k + |exclude| so that dropping excluded items still leaves k answers when the catalog allows.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    exclude = exclude or [set() for _ in range(len(batch))]
    release.model.eval()
    u = release.model.user_vectors(batch).cpu().numpy().astype(np.float32)  # (b, d)
    depth = min(k + max((len(e) for e in exclude), default=0), len(release.item_ids))
    scores, ids = release.search(u, depth)
    out = []
    for row_scores, row_ids, ex in zip(scores, ids, exclude, strict=True):
        keep = [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0 and int(i) not in ex]
        out.append({"release": release.release_id,
                    "items": [{"item_id": i, "score": s} for i, s in keep[:k]]})
    return out
