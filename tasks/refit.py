"""Refit's rows: after early stopping picked the epoch count, train again from scratch on train + validation rows.

Early stopping needs a validation day that training never saw; on a time split that day holds the freshest items and
engagements, which the released model would then never learn (on the synthetic world, search targets at most 2 days
old: recall@10 0.028 against the oracle's 0.806, README). The refit trains a second model on train + the validation
window's rows (``Examples.refit_extra``: every positive of that window, not one per user) for the first run's best
epoch count, with the same seed, the same schedule shape (the cosine decays over ``config.epochs`` epochs, so epoch k
takes the same learning rates in both runs) and the same weight averaging, and keeps its last weights: there is no
split left to judge them on. The holdout the gate judges is never among the rows. The loop itself is
``tasks.train.refit`` (it shares that module's pieces); this module says when and on which rows.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from towerflow.config import AugmentConfig, TrainConfig
from towerflow.models.batch import ItemFeatures
from towerflow.tasks.augment_context import AugmentStats, augment_context
from towerflow.tasks.build_examples import Examples, SequenceExamples


def refit_wanted(config: TrainConfig, examples: Examples) -> tuple[bool, str]:
    """``config.refit`` resolved for ``examples`` -> (refit or not, why, for the progress output).

    auto: on for a time split (the validation day is the freshest data), off for leave-one-out (a user's
    second-to-last positive, no fresher than the rest). Never without validation rows to add.
    """
    split = examples.meta.get("split")
    if config.refit is False:
        return False, "refit off"
    if config.refit == "auto" and split != "time":  # before the rows: the augment stage drops them in this case
        return False, f"refit auto -> off ({split or 'unknown'} split)"
    if examples.valid is None or examples.refit_extra is None or not len(examples.refit_extra):
        why = "no validation split" if examples.valid is None else "the examples hold no validation rows to add"
        return False, f"no refit ({why})"
    if config.refit == "auto":
        return True, "refit auto -> on (time split: the validation day holds the freshest items)"
    return True, "refit on"


def augment_refit_rows(
    raw_train: SequenceExamples, extra: SequenceExamples, item_feats: ItemFeatures, config: AugmentConfig | None = None,
    item_text: list[str] | None = None,
) -> SequenceExamples:
    """``extra`` with the pseudo-contexts and pseudo-queries ``augment_context`` gives it among ``raw_train`` +
    ``extra`` (sessions and co-engagements counted over both, as if they were one training split). Call it with
    the training rows as built, before ``augment_context`` replaced them."""
    augmented, _ = augment_context(raw_train.concat(extra), item_feats, config, item_text)
    return augmented.take(np.arange(len(raw_train), len(augmented)))


def refit_examples(examples: Examples) -> Examples:
    """``examples`` whose ``train`` is train + ``refit_extra`` and which have no validation split left."""
    return replace(examples, train=examples.train.concat(examples.refit_extra), valid=None, valid_seen=None,
                   refit_extra=None, meta={**examples.meta, "n_train": len(examples.train) + len(examples.refit_extra)})


def augment_examples(
    examples: Examples, config: AugmentConfig | None = None, refit: bool = True
) -> tuple[Examples, AugmentStats]:
    """``examples`` with ``augment_context`` applied to ``train`` (its stats returned) and ``augment_refit_rows`` to
    ``refit_extra``: the retrain's augmentation, one call for both training sets. ``refit=False`` (no refit will
    train on them, ``refit_wanted``) drops ``refit_extra`` instead of paying for its augmentation."""
    extra = examples.refit_extra if refit else None
    if extra is not None:
        extra = augment_refit_rows(examples.train, extra, examples.item_feats, config, examples.item_text)
    train, stats = augment_context(examples.train, examples.item_feats, config, examples.item_text)
    return replace(examples, train=train, refit_extra=extra), stats
