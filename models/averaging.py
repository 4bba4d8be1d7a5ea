"""A moving average of a model's weights (Polyak averaging), for evaluation and for the kept model.

After the t-th optimizer step ``update`` moves each averaged tensor a share ``1 / min(t, span)`` of the way to the live
one: for the first ``span`` steps the average is the plain mean of the weights so far, after that an exponential
average over about ``span`` steps (``avg <- (1 - 1/span) * avg + w / span``). Spanning a couple of epochs, it smooths
the step-to-step noise of a small-batch softmax: the epoch-end metric early stopping watches moves less by chance, and
the averaged weights usually score above the live ones they average (bench/public_split.py, README).

Only the parameters are averaged; buffers (feature tables, log q: constants in training) are the live ones.
``applied`` swaps the average into the model for a block (evaluation, copying the best state) and puts the live
weights back after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The running average of ``model``'s parameters over about ``span`` steps."""

    def __init__(self, model: nn.Module, span: float):
        if not span >= 1:
            raise ValueError(f"weight average span must be at least 1 step, got {span}")
        self.span, self.steps = float(span), 0
        # the parameters themselves (updated in place by the optimizer), each once even when modules share it (the
        # towers' item tower); buffers (feature tables, log q) are constants in training and stay the live ones
        live = {k: v.detach() for k, v in model.named_parameters() if v.dtype.is_floating_point}
        self.weights = {k: v.clone() for k, v in live.items()}
        self._pairs = (list(self.weights.values()), list(live.values()))

    @torch.no_grad()
    def update(self) -> None:
        """One step: avg += (w - avg) / min(steps, span) for every averaged tensor (one fused call)."""
        self.steps += 1
        torch._foreach_lerp_(self._pairs[0], self._pairs[1], 1.0 / min(self.steps, self.span))

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the step count and the averaged tensors."""
        return {"steps": self.steps, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s output (a checkpoint's), in place."""
        missing = self.weights.keys() - state["weights"].keys()
        if missing:
            raise KeyError(f"weight average checkpoint lacks {sorted(missing)}")
        self.steps = int(state["steps"])
        for k, v in self.weights.items():
            v.copy_(state["weights"][k])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights; the live ones come back after it."""
        live = [t.clone() for t in self._pairs[1]]
        with torch.no_grad():
            for avg, w in zip(*self._pairs, strict=True):
                w.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, w in zip(live, self._pairs[1], strict=True):
                    w.copy_(saved)
