"""Future targets: each training history also predicts the user's next few engagements, not only the next one.

PinnerFormer (Pinterest, KDD 2022) trains a user embedding to predict every action in a window after it (the
"dense all-action" loss) rather than the next action alone: an embedding served for a while should point at what the
user will do over that while. Here the window is the user's next ``n`` training targets: for a train row at position
``i`` of its user's sequence, rows ``i + 1 .. i + n - 1`` of the same user are copied with row ``i``'s history. A
copy keeps the later row's request (target, time, viewed item, surface, query): it is that request answered from a
history ``j`` engagements stale, which is also what hybrid serving does between two refreshes of a user's state.

Why it helps on data such as MovieLens: a user rates dozens of films in one sitting, and the order inside the sitting
says little, so "the very next rating" is a noisy label; the next few are a steadier one (MovieLens-100K, the public
path's split, 3 seeds: README "The command line" and "Figures"). On the daily synthetic world the next action is
sharply defined by the viewed item, so ``auto`` leaves it off there (``future_window``).
"""

from __future__ import annotations

import numpy as np

from towerflow.tasks.build_examples import SequenceExamples

AUTO_FUTURE_TARGETS = 3  # what future_targets "auto" means on a leave-one-out split
_HISTORY_FIELDS = ("user_idx", "hist_items", "hist_actions", "hist_gaps")


def future_window(setting: str | int, split: str | None) -> tuple[int, str | None]:
    """``TrainConfig.future_targets`` resolved for examples cut by ``split`` -> (n, why auto chose it or None)."""
    if setting != "auto":
        return int(setting), None
    if split == "leave_one_out":
        return AUTO_FUTURE_TARGETS, (f"future_targets auto -> {AUTO_FUTURE_TARGETS} (leave-one-out split: each history "
                                     f"also predicts the user's next {AUTO_FUTURE_TARGETS - 1} engagements)")
    return 1, f"future_targets auto -> 1 ({split or 'unknown'} split: each history predicts its next engagement)"


def with_future_targets(train: SequenceExamples, n: int) -> SequenceExamples:
    """``train`` with, for j = 1 .. n - 1, each row ``i + j`` of a user's sequence copied with row ``i``'s history.

    A user's sequence is their rows ordered by ``ts`` (ties keep the row order, as build_examples writes them).
    Each copy follows the row whose request it keeps (the row, then its copies by growing j), so the rows stay in
    ``train``'s time order for whatever reads them in order (the streaming log q estimator). Rows of unknown users
    (``user_idx == 0``, every such user pooled) get no copies. n = 1 returns ``train`` itself.
    """
    if n < 1:
        raise ValueError(f"future_targets must be >= 1, got {n}")
    if n == 1 or len(train) == 0:
        return train
    order = np.lexsort((np.arange(len(train)), train.ts, train.user_idx))  # (m,) user, then time, then row
    user = train.user_idx[order]
    requests, histories = [np.arange(len(train))], [np.arange(len(train))]  # row j of the output: their rows
    for j in range(1, n):
        same = (user[:-j] == user[j:]) & (user[j:] > 0)
        if not same.any():
            break
        requests.append(order[j:][same])  # the later row keeps its request ...
        histories.append(order[:-j][same])  # ... with the history of the row j before it
    if len(requests) == 1:
        return train
    by_request = np.argsort(np.concatenate(requests), kind="stable")
    out = train.take(np.concatenate(requests)[by_request])
    history = np.concatenate(histories)[by_request]
    for name in _HISTORY_FIELDS:
        setattr(out, name, getattr(train, name)[history])
    return out
