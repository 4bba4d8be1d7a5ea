"""The retrieval path serving uses: user vectors from a release's user tower, searched in the SAME release's index.

``answer`` is the one function that turns encoded requests into ``{release, items: [{item_id, score}]}``; the
release gate calls it on sample queries before promotion, and the service calls it for every request (with the
history states ``h`` it already has), so what is gated is what serves. The user vector is always
``combine(encode_history(history), context)``: the split the hybrid service relies on, so a stored ``h`` and an
``h`` computed from events go through the same code.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from towerflow.infra.releases import LoadedRelease
from towerflow.models.batch import N_SURFACES, Batch
from towerflow.models.query import encode_texts

if TYPE_CHECKING:
    from towerflow.serving.realtime.live_items import LiveIndex

log = logging.getLogger("towerflow.serving")
# trace_combine's TracerWarnings (shapes taken as constants) are checked on probe batches instead; set once here, as
# warnings.catch_warnings() around each trace would swap the process-wide filters under serving threads
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def context_batch(context_items: torch.Tensor, surface: torch.Tensor, user_feats: torch.Tensor,
                  query: torch.Tensor | None = None) -> Batch:
    """A Batch for requests whose history states ``h`` are already known: (b,) (b,) (b, F), query (b, T) token
    hashes or None -> Batch. The query is online only: it joins the context, never the stored ``h``.

    Its history fields are a single padding slot (an empty history); ``answer(..., h=h)`` does not read them.
    """
    b = len(context_items)
    empty = torch.zeros((b, 1), dtype=torch.long)
    return Batch(hist_items=empty, hist_actions=empty, hist_gaps=empty, context_items=context_items,
                 surface=surface, user_feats=user_feats, target_items=torch.zeros(b, dtype=torch.long), query=query)


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
                 item_table: torch.Tensor | None = None, context_vecs: torch.Tensor | None = None,
                 combine: Combine | None = None) -> np.ndarray:
    """The online half: combine h (b, history_dim) with the batch's context -> u (b, d) float32.

    ``h`` None: encode the batch's histories first (the full online path). ``item_table``: as in encode_histories.
    ``context_vecs`` (b, d): the viewed items' vectors when some are not in ``item_table`` (live items, whose
    ``batch.context_items`` only says "viewed", > 0); default: looked up in ``item_table``.
    ``combine``: the release's traced context layer (``trace_combine``), for inputs the service built from the
    release's own codes; default the tower's checked ``combine``.
    """
    _eval(release)
    if h is None:
        h = encode_histories(release, batch, item_table)
    if context_vecs is None and item_table is not None:
        context_vecs = item_table[batch.context_items]  # (b, d)
    if combine is not None and context_vecs is not None:
        query = batch.query if batch.query is not None else torch.zeros((len(h), 1), dtype=torch.long)
        u = combine(h, batch.context_items, batch.surface, batch.user_feats, context_vecs, query)
    else:
        u = release.model.user_tower.combine(h, batch.context_items, batch.surface, batch.user_feats, context_vecs,
                                             batch.query)
    return u.cpu().numpy().astype(np.float32, copy=False)


# h (b, history_dim), context items (b,), surfaces (b,), user feats (b, F), context vecs (b, d), query (b, T) -> (b, d)
Combine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _ContextLayer(torch.nn.Module):
    def __init__(self, user_tower: torch.nn.Module):
        super().__init__()
        self.user_tower = user_tower

    def forward(self, h, context_items, surface, user_feats, context_vecs, query):
        return self.user_tower.context_layer(h, context_items, surface, user_feats, context_vecs, query)


@torch.inference_mode()
def trace_combine(user_tower: torch.nn.Module, item_table: torch.Tensor, tol: float = 1e-6) -> Combine | None:
    """The eval-mode context layer (``UserTower.context_layer``) traced into one TorchScript graph, or None when
    tracing fails or the graph answers a probe batch differently from eager ``combine`` (by more than ``tol``).

    Why: eager ``combine`` is ~75 small torch calls a batch, each releasing and retaking the GIL the HTTP event loop
    holds; the graph releases it once (its CPU cost halves too). Traced on one batch size and query width, checked
    on others, as the graph must serve any batch.
    """
    was_training = user_tower.training
    try:
        user_tower.eval()
        layer = _ContextLayer(user_tower).eval()
        graph = torch.jit.freeze(torch.jit.trace(layer, _probe(user_tower, item_table, 4, "kalo venmi"),
                                                 check_trace=False))
        for n, text in ((3, "a b c d e f g"), (1, None), (5, "x")):
            probe = _probe(user_tower, item_table, n, text)
            for _ in range(2):  # the graph executor profiles its first runs, then optimises: check both
                err = float((graph(*probe) - user_tower.combine(*probe)).abs().max())
                if err > tol:
                    log.warning("traced combine differs from eager by %.3g on a probe batch: serving eager", err)
                    return None
        return graph
    except Exception as exc:  # noqa: BLE001 - eager combine serves whatever tracing could not do
        log.warning("combine could not be traced (%s): serving eager", exc)
        return None
    finally:
        user_tower.train(was_training)


def _probe(user_tower: torch.nn.Module, item_table: torch.Tensor, n: int, text: str | None) -> tuple:
    """A batch of n requests of every kind: with and without a viewed item and a query, each surface, codes in
    range -> combine's inputs (h, context items, surfaces, user feats, context vecs, query)."""
    g = torch.Generator().manual_seed(n)
    h = torch.randn((n, user_tower.history_dim), generator=g)
    ctx = torch.randint(0, len(item_table), (n,), generator=g)
    ctx[0] = 0  # no viewed item
    cards = user_tower.sizes.demographic_cardinalities
    feats = torch.zeros((n, len(cards)), dtype=torch.long)
    for i, card in enumerate(cards):
        feats[:, i] = torch.randint(0, card + 1, (n,), generator=g)
    query = torch.from_numpy(encode_texts([text if i % 2 else None for i in range(n)]))
    return h, ctx, torch.arange(n) % N_SURFACES, feats, item_table[ctx], query


def search_depth(k: int, n_excluded: int, n_items: int) -> int:
    """How deep a request asking ``k`` items minus ``n_excluded`` ids searches: k + n_excluded rounded up to a power
    of two (at least 16), at most ``n_items``.

    A function of the request alone, so a request searched in a batch gets exactly what it gets alone, whatever
    its neighbours ask: an approximate index's answer depends on the depth asked (HNSW searches max(efSearch, k)
    candidates), and requests of one depth bucket share one FAISS call.
    """
    return min(max(16, 1 << (k + n_excluded - 1).bit_length()), n_items)


def excluded(ids: np.ndarray, exclude: Sequence[np.ndarray]) -> np.ndarray:
    """ids (r, depth) int64, one array of ids to exclude per row -> (r, depth) bool: ``ids[j, c] in exclude[j]``.

    Short lists (most users have seen a few dozen items) are compared all at once against the rows' lists padded
    to one width (padded with their own first id, or with -1, FAISS's "no result", when empty); long ones by a
    binary search of each row's ids in its sorted list (7x cheaper than ``np.isin``, which sorts both sides).
    """
    width = max((len(e) for e in exclude), default=0)
    if width == 0:
        return np.zeros(ids.shape, dtype=bool)
    if ids.shape[1] * width <= 8192:
        pad = np.full((len(exclude), width), -1, dtype=np.int64)  # (r, width)
        for j, e in enumerate(exclude):
            if len(e):
                pad[j, :len(e)], pad[j, len(e):] = e, e[0]
        return (ids[:, :, None] == pad[:, None, :]).any(axis=2)
    out = np.zeros(ids.shape, dtype=bool)
    for j, e in enumerate(exclude):
        if len(e):
            ordered = np.sort(e)
            out[j] = ordered[np.minimum(np.searchsorted(ordered, ids[j]), len(e) - 1)] == ids[j]
    return out


def search(release: LoadedRelease, u: np.ndarray, k: int | Sequence[int],
           exclude: Sequence[np.ndarray | set[int]] | None = None, live: LiveIndex | None = None) -> list[dict]:
    """u (b, d) -> b responses naming ``release``: its index's top k item ids by inner product, minus ``exclude[i]``.

    ``k``: one for all rows or one per row. Searches ``search_depth(k, |exclude|)`` so that dropping excluded items
    still leaves k answers when the catalog allows; rows of one depth share one index search, and the excluded
    ids are dropped with one vectorised membership test per row (no Python set per request).
    ``live``: items added after the release was built (serving/realtime/live_items.py), searched beside its index
    and merged by score; the release's index itself is never written to.
    """
    n = len(u)
    ks = [k] * n if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != n or min(ks, default=1) < 1:
        raise ValueError(f"k must be >= 1 for each of the {n} rows, got {k}")
    none = np.zeros(0, dtype=np.int64)
    ex = [none if e is None else np.fromiter(e, np.int64, len(e)) if isinstance(e, set | frozenset)
          else np.asarray(e, dtype=np.int64) for e in (exclude or [none] * n)]
    n_items = len(release.item_ids)
    depths = np.array([search_depth(ki, len(e), n_items) for ki, e in zip(ks, ex, strict=True)], dtype=np.int64)
    out: list[dict] = [{}] * n
    for depth in np.unique(depths).tolist():
        rows = np.flatnonzero(depths == depth)
        scores, ids = release.search(u[rows], depth)  # (r, depth) each
        if live is not None and len(live):
            scores, ids = live.merge(u[rows], scores, ids, depth)  # (r, depth + min(depth, live items))
        keep = (ids >= 0) & ~excluded(ids, [ex[i] for i in rows.tolist()])  # (r, depth)
        for j, i in enumerate(rows.tolist()):
            row_ids = ids[j]
            sel = np.flatnonzero(keep[j])[:ks[i]]
            out[i] = {"release": release.release_id,
                      "items": [{"item_id": a, "score": s}
                                for a, s in zip(row_ids[sel].tolist(), scores[j][sel].tolist(), strict=True)]}
    return out


def answer(release: LoadedRelease, batch: Batch, k: int, exclude: Sequence[set[int]] | None = None,
           h: torch.Tensor | None = None, item_table: torch.Tensor | None = None,
           live: LiveIndex | None = None) -> list[dict]:
    """b encoded requests -> b responses naming ``release``; ``exclude[i]`` holds item ids request i must not get.

    ``h`` (b, history_dim): history states already computed by this release's tower (the hybrid path); the
    batch's history fields are then not read. ``item_table``: see encode_histories. ``live``: see search.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return search(release, user_vectors(release, batch, h, item_table), k, exclude, live)


def _eval(release: LoadedRelease) -> None:
    if release.model.training:  # a loaded model is in eval mode already; don't walk its modules every request
        release.model.eval()
