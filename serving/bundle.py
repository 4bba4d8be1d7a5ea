"""Everything a request needs from one release, swapped as ONE object: towers, index, vocabulary, profiles.

A ``ServingBundle`` is immutable once built. The service holds the current one in a single attribute; a request
reads that attribute once and uses only what it got, so the user tower, the index, the vocabulary (item ids <->
indices of THIS release) and the profile codes it uses always belong to one release, whatever swaps meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import torch

from towerflow.infra.releases import LoadedRelease, ReleaseIntegrityError
from towerflow.serving.retrieval import Combine, answer, context_batch, trace_combine
from towerflow.tasks.history import HistoryFormatError, HistorySpec
from towerflow.tasks.vocabulary import Vocab, user_features


@dataclass(frozen=True)
class UserProfiles:
    """Demographic value codes of every user of the users table, in one release's value vocabulary."""

    user_ids: np.ndarray  # (n,) int64, sorted
    feats: np.ndarray  # (n + 1, F) int64; row 0 = unknown user (all codes 0)

    @classmethod
    def build(cls, users: pd.DataFrame | None, vocab: Vocab) -> UserProfiles:
        """Codes for every user of ``users`` (also users who signed up after the release was trained)."""
        if users is None or users.empty:
            return cls(np.zeros(0, dtype=np.int64), np.zeros((1, len(vocab.demographic_fields)), dtype=np.int64))
        users = users.drop_duplicates("user_id", keep="last")
        everyone = Vocab(vocab.item_ids, np.sort(users["user_id"].to_numpy(dtype=np.int64)), vocab.categories,
                         vocab.genres, vocab.demographic_fields, vocab.demographic_values)
        return cls(everyone.user_ids, user_features(users, everyone))

    def of(self, user_ids: np.ndarray) -> np.ndarray:
        """(b,) raw user ids -> (b, F) codes; unknown users get zeros."""
        ids = np.asarray(user_ids, dtype=np.int64)
        if len(self.user_ids) == 0:
            return self.feats[np.zeros(len(ids), dtype=np.int64)]
        pos = np.searchsorted(self.user_ids, ids)
        found = (pos < len(self.user_ids)) & (self.user_ids[np.minimum(pos, len(self.user_ids) - 1)] == ids)
        return self.feats[np.where(found, pos + 1, 0)]


@dataclass(frozen=True)
class ServingBundle:
    release: LoadedRelease
    vocab: Vocab
    profiles: UserProfiles
    item_order: np.ndarray  # (n,) positions of release.item_ids in sorted order (item id -> row of item_vectors)
    item_table: torch.Tensor  # (n_items + 1, d): the item tower's vector of each item index (row 0: padding)
    popular_ids: np.ndarray  # (n,) item ids, most popular first (the release's q table)
    popular_scores: np.ndarray  # (n,) their sampling probability q
    history: HistorySpec  # how the release's histories are built (tasks/history.py), from its config.json
    loaded_at: datetime
    cooccurrence: Any = None  # tasks.evaluate.CooccurrenceBaseline fitted for this release (serving/cooccurrence.py)
    combine: Combine | None = None  # the user tower's context layer traced (retrieval.trace_combine); None: eager

    @property
    def release_id(self) -> str:
        return self.release.release_id

    @property
    def max_seq_len(self) -> int:
        return self.history.max_seq_len

    @property
    def history_dim(self) -> int:
        return int(self.release.model.history_dim)

    def item_index(self, item_ids) -> np.ndarray:
        """(b,) raw item ids -> (b,) indices of this release's vocabulary, 0 for items it does not know."""
        return self.vocab.item_index(np.asarray(item_ids, dtype=np.int64))

    def item_row(self, item_id: int) -> int | None:
        """Row of ``item_id`` in the release's item vectors, or None when the release has no such item."""
        ids = self.release.item_ids
        p = int(np.searchsorted(ids, item_id, sorter=self.item_order))
        if p < len(ids) and int(ids[self.item_order[p]]) == item_id:
            return int(self.item_order[p])
        return None


def build_bundle(release: LoadedRelease, users: pd.DataFrame | None) -> ServingBundle:
    """Wrap a loaded, verified release for serving; answers one query to warm it up (and prove it answers)."""
    if release.vocab_dir is None or not (release.vocab_dir / "vocab.json").is_file():
        raise ReleaseIntegrityError(f"release {release.release_id} has no vocab/vocab.json: serving cannot map "
                                    "item and user ids to the tower's indices")
    vocab = Vocab.from_json((release.vocab_dir / "vocab.json").read_text())
    model = release.model
    if model.sizes.n_items != vocab.n_items:
        raise ReleaseIntegrityError(f"release {release.release_id}: the user tower knows {model.sizes.n_items} "
                                    f"items, its vocabulary {vocab.n_items}")
    try:
        history = HistorySpec.from_release_config(release.release_id, release.config if isinstance(
            release.config, dict) else {})
    except HistoryFormatError as exc:
        raise ReleaseIntegrityError(str(exc)) from exc
    if not 1 <= history.max_seq_len <= model.cfg.max_seq_len or history.gap_buckets != model.cfg.gap_buckets:
        raise ReleaseIntegrityError(f"release {release.release_id}: histories of {history.max_seq_len} actions in "
                                    f"{history.gap_buckets} gap buckets do not fit its tower (position table "
                                    f"{model.cfg.max_seq_len}, {model.cfg.gap_buckets} gap buckets)")
    item_table = _item_table(release, vocab)
    if release.ranker is not None and not np.array_equal(release.ranker_rows(vocab.item_ids),
                                                         np.arange(1, vocab.n_items + 1)):
        # /recommend numbers history items by the vocabulary (the ranking examples' numbering) and candidates too
        raise ReleaseIntegrityError(f"release {release.release_id}: its ranker's item rows are not its vocabulary's "
                                    "item indices")
    log_q = release.q_table if release.q_table is not None else np.zeros(vocab.n_items + 1)
    order = np.argsort(-np.asarray(log_q[1:], dtype=np.float64), kind="stable")
    bundle = ServingBundle(
        release=release, vocab=vocab, profiles=UserProfiles.build(users, vocab),
        item_order=np.argsort(release.item_ids, kind="stable"), item_table=item_table,
        popular_ids=vocab.item_ids[order], popular_scores=np.exp(np.asarray(log_q[1:], dtype=np.float64))[order],
        history=history, loaded_at=datetime.now(UTC), combine=trace_combine(model.user_tower, item_table),
    )
    b = context_batch(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.from_numpy(bundle.profiles.of(np.zeros(1, dtype=np.int64))))
    answer(release, b, 1, h=torch.zeros((1, bundle.history_dim)), item_table=item_table)
    return bundle


@torch.inference_mode()
def _item_table(release: LoadedRelease, vocab: Vocab, n_check: int = 64) -> torch.Tensor:
    """The release's item embeddings arranged by vocabulary index, checked against its own item tower.

    Serving looks history and context items up here instead of running the item tower per request. A sample of
    rows is recomputed with the tower: vectors that another model produced are refused, whatever their checksums.
    """
    order = np.argsort(release.item_ids, kind="stable")
    pos = np.searchsorted(release.item_ids, vocab.item_ids, sorter=order)
    rows = order[np.minimum(pos, len(order) - 1)]
    if len(release.item_ids) != vocab.n_items or not np.array_equal(release.item_ids[rows], vocab.item_ids):
        raise ReleaseIntegrityError(f"release {release.release_id}: the index's items are not the vocabulary's "
                                    f"({len(release.item_ids)} vs {vocab.n_items})")
    model = release.model
    model.eval()
    pad = model.item_tower(torch.zeros(1, dtype=torch.long))  # (1, d): what padding slots carry
    table = torch.cat([pad, torch.from_numpy(np.asarray(release.item_vectors, dtype=np.float32)[rows])])
    check = torch.from_numpy(np.unique(np.linspace(1, vocab.n_items, min(n_check, vocab.n_items)).astype(np.int64)))
    err = float((model.item_tower(check) - table[check]).abs().max())
    if err > 1e-4:
        raise ReleaseIntegrityError(f"release {release.release_id}: its item embeddings are not its item tower's "
                                    f"(max difference {err:.3g}); tower and index must come from one model")
    return table
