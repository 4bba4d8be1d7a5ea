"""The second candidate generator of ``POST /recommend``: item co-occurrence, the baseline the evaluation fits
(``tasks/evaluate.CooccurrenceBaseline``), beside the two-tower index (learned retrieval beside a heuristic generator,
as on Pinterest's Homefeed).

The release does not store it (yet): ``fit_for_release`` fits it when a release is loaded, on the training split of
the release's OWN snapshot, rebuilt with the release's examples config (``tasks/build_examples.build_examples``), so
it counts what the evaluation counted (less the flow's pseudo-contexts, which ``augment_context`` adds to the
training rows before evaluating), the validation day's rows included when the release's model was refit on them. A
ranker-only release (its snapshot newer than the retriever it serves) is fitted on its own snapshot re-expressed in
the retriever's vocabulary (``tasks/scoring.remap_examples``: items the retriever does not know drop out). A release
whose snapshot is gone from this machine is served by the two-tower generator alone (logged).

``candidates``: a user's sources are their distinct positive history items (the release's history definition) and the
context item; an item's score is the sum over sources of C[source, item] plus the baseline's popularity tie-break
(below 1); only items co-occurring with some source (score >= 1) are candidates, seen items and the context excluded.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from towerflow.config import ExamplesConfig, Settings
from towerflow.tasks.build_examples import SequenceExamples
from towerflow.tasks.evaluate import CooccurrenceBaseline
from towerflow.tasks.history import SeenItems
from towerflow.tasks.scoring import remap_examples
from towerflow.tasks.vocabulary import Vocab

log = logging.getLogger("towerflow.serving")


def fit_for_release(release, vocab: Vocab, settings: Settings) -> CooccurrenceBaseline | None:
    """The co-occurrence counts of ``release``'s snapshot's training split, or None (logged) when they cannot be
    rebuilt here. Scores one user at a time on the sparse path (no dense n x n matrix)."""
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.extract import Snapshot

    snapshot_id = release.manifest.snapshot_id
    path = settings.snapshots_dir / snapshot_id
    t0 = time.perf_counter()
    try:
        snap = Snapshot.load(path)
        config = ExamplesConfig.model_validate((release.config or {}).get("examples", {}))
        examples = build_examples(snap.events(), snap.users(), snap.items(), snap.window[1], config)
    except Exception as exc:  # noqa: BLE001 - the two-tower generator serves on without it
        log.warning("release %s: no co-occurrence generator (snapshot %s: %s)", release.release_id, snapshot_id, exc)
        return None
    train = examples.train
    if _refit(release, examples):  # the released model also learned the validation day's rows: count them too
        train = train.concat(examples.refit_extra)
    if not np.array_equal(examples.vocab.item_ids, vocab.item_ids):
        # e.g. a ranker-only release: its snapshot is newer than the retriever's vocabulary. Through the raw ids;
        # items the served release does not know leave the sources, and rows with such a target go
        empty = SeenItems(np.zeros(len(train) + 1, np.int64), np.zeros(0, np.int64))
        train, _ = remap_examples(train, empty, examples.vocab, vocab)
        train = train.take(train.target_items > 0)
    base = CooccurrenceBaseline.fit(train, vocab.n_items)
    log.info("release %s: co-occurrence generator from snapshot %s (%d pairs, %.1fs)", release.release_id,
             snapshot_id, len(base.vals), time.perf_counter() - t0)
    return CooccurrenceBaseline(base.indptr, base.cols, base.vals, base.popularity, dense_max_items=0)


def _refit(release, examples) -> bool:
    """Whether the release's model was refit on train + validation rows (tasks/refit.py): its recorded ``train``
    config resolved for these examples, as the retrain resolved it. A release from before the refit records no
    ``train.refit`` and was not refit."""
    from towerflow.config import TrainConfig
    from towerflow.tasks.refit import refit_wanted

    train = (release.config or {}).get("train") or {}
    return "refit" in train and refit_wanted(TrainConfig.model_validate(train), examples)[0]


def candidates(base: CooccurrenceBaseline, vocab: Vocab, hist_items: np.ndarray, hist_actions: np.ndarray,
               context_item: int, n: int, exclude_ids: np.ndarray) -> list[dict]:
    """The ``n`` best co-occurring items for one user -> ``[{"item_id", "score"}]`` best first.

    hist_items, hist_actions: (L,) the user's history (vocabulary indices, ACTION_INDEX codes, 0 = padding);
    context_item: its vocabulary index (0: none); exclude_ids: raw item ids never to return.
    """
    one = SequenceExamples(user_idx=np.zeros(1, np.int64), hist_items=hist_items[None].astype(np.int64),
                           hist_actions=hist_actions[None].astype(np.int64),
                           hist_gaps=np.zeros((1, len(hist_items)), np.int64),
                           context_items=np.array([context_item], np.int64), surface=np.zeros(1, np.int64),
                           target_items=np.zeros(1, np.int64), ts=np.zeros(1, np.int64))
    scores = base.scorer(one)(np.zeros(1, dtype=np.int64))[0]  # (n_items + 1,)
    scores[0] = 0.0  # padding
    scores[vocab.item_index(np.asarray(exclude_ids, dtype=np.int64))] = 0.0  # unknown ids map to 0 too
    if context_item:
        scores[context_item] = 0.0
    top = np.flatnonzero(scores >= 1.0)  # co-occurs with some source; below 1 is the popularity tie-break alone
    top = top[np.argsort(-scores[top], kind="stable")][:n]
    return [{"item_id": int(i), "score": float(s)} for i, s in zip(vocab.item_ids[top - 1].tolist(),
                                                                    scores[top].tolist(), strict=True)]
