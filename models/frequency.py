"""Item sampling probabilities for the logQ correction: streaming (Yi et al., KDD 2019) or from exact counts.

The streaming estimator (the paper's Algorithm 2) keeps two arrays over hash buckets: A = the last step at which
the bucket was seen, B = an exponential moving average of the gap, in steps, between sightings. After the
stream settles, 1/B estimates how often the item turns up per batch.

One generalisation, because our batches are vectorised and popular items appear several times in one batch:
c copies of an item at one step count as c sightings spaced gap/c apart, i.e. the EMA update is applied c times
with gap/c. For c = 1 this is exactly the paper's update; for larger c, 1/B estimates the expected number of
copies per batch instead of saturating at one appearance per batch.
"""

from __future__ import annotations

import torch

from towerflow.errors import TowerflowError

_PRIME = 2_147_483_647  # 2^31 - 1: a * (id mod p) + b stays inside int64


class FrequencyError(TowerflowError, ValueError):
    """Bad input to a frequency estimator (steps going backwards, bad state, non-positive counts)."""


class StreamingFrequencyEstimator:
    """Streaming estimate of each item's per-example sampling probability.

    ``update(ids, step)`` once per training batch (ids = that batch's positive items, repeats included), then
    ``log_probability(ids)`` gives log q for the loss. Items that share a hash bucket share an estimate, so
    ``n_buckets`` should be well above the number of distinct items.
    """

    def __init__(self, n_buckets: int = 1 << 20, alpha: float = 0.01, seed: int = 0):
        if n_buckets < 1 or not 0 < alpha < 1:
            raise FrequencyError(f"need n_buckets >= 1 and 0 < alpha < 1, got {n_buckets}, {alpha}")
        self.n_buckets, self.alpha, self.seed = n_buckets, alpha, seed
        g = torch.Generator().manual_seed(seed)
        self._hash_a = int(torch.randint(1, _PRIME, (1,), generator=g))
        self._hash_b = int(torch.randint(0, _PRIME, (1,), generator=g))
        self.last_seen = torch.full((n_buckets,), -1, dtype=torch.int64)  # A; -1 = never seen
        self.gap = torch.zeros(n_buckets, dtype=torch.float64)  # B
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.n_updates = 0
        self.n_ids = 0

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n,) int -> bucket (n,) int64, by universal hashing ((a x + b) mod p) mod n_buckets."""
        x = torch.remainder(ids.long().cpu(), _PRIME)
        return torch.remainder(torch.remainder(self._hash_a * x + self._hash_b, _PRIME), self.n_buckets)

    def update(self, ids: torch.Tensor, step: int) -> None:
        """Record the ids (n,) of one batch seen at training ``step`` (steps must not go backwards)."""
        if self.last_step is not None and step < self.last_step:
            raise FrequencyError(f"step {step} is before the last step seen ({self.last_step})")
        if ids.numel() == 0:
            return
        if self.first_step is None:
            self.first_step = step
        buckets, counts = torch.unique(self.bucket(ids.reshape(-1)), return_counts=True)
        last = self.last_seen[buckets]
        never = last < 0
        # A bucket seen for the first time counts as last seen just before the stream began, and its gap starts
        # at that observation rather than at 0 (an EMA from 0 would make new items look hugely popular).
        since = torch.where(never, torch.full_like(last, self.first_step - 1), last)
        c = counts.double()
        observed = (step - since).double() / c  # (k,) gap per copy
        decay = (1 - self.alpha) ** c
        self.gap[buckets] = torch.where(never, observed, decay * self.gap[buckets] + (1 - decay) * observed)
        self.last_seen[buckets] = step
        self.last_step = step
        self.n_updates += 1
        self.n_ids += ids.numel()

    def expected_count(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n,) -> (n,) float64: estimated copies of each item per batch (1 / B).

        An item never seen gets 1 / (steps so far + 1): less than once over the whole stream, yet finite.
        """
        if self.n_updates == 0:
            raise FrequencyError("the estimator has seen no batch yet")
        buckets = self.bucket(ids.reshape(-1))
        gap = self.gap[buckets]
        never = self.last_seen[buckets] < 0
        gap = torch.where(never, torch.full_like(gap, self.last_step - self.first_step + 2.0), gap)
        return (1.0 / gap).reshape(ids.shape)

    @property
    def mean_batch_size(self) -> float:
        return self.n_ids / self.n_updates if self.n_updates else 0.0

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n,) -> (n,) float64: estimated probability that one example's item is that item.

        = expected copies per batch / mean batch size seen, i.e. the paper's 1/B divided by the batch size.
        """
        return self.expected_count(ids) / self.mean_batch_size

    def log_probability(self, ids: torch.Tensor) -> torch.Tensor:
        """log of ``probability`` as float32 on the ids' device -> (n,); the log q the loss takes."""
        return self.probability(ids).log().float().to(ids.device)

    def state_dict(self) -> dict:
        """Tensors and plain numbers only, so ``torch.load(weights_only=True)`` reads it back."""
        return {
            "n_buckets": self.n_buckets,
            "alpha": self.alpha,
            "seed": self.seed,
            "last_seen": self.last_seen.clone(),
            "gap": self.gap.clone(),
            "first_step": -1 if self.first_step is None else self.first_step,
            "last_step": -1 if self.last_step is None else self.last_step,
            "n_updates": self.n_updates,
            "n_ids": self.n_ids,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``; n_buckets and seed must match (they fix the hash)."""
        if (state["n_buckets"], state["seed"]) != (self.n_buckets, self.seed):
            raise FrequencyError(
                f"state has n_buckets={state['n_buckets']} seed={state['seed']}, "
                f"estimator has n_buckets={self.n_buckets} seed={self.seed}"
            )
        self.alpha = float(state["alpha"])
        self.last_seen = state["last_seen"].clone().long()
        self.gap = state["gap"].clone().double()
        self.first_step = None if state["first_step"] < 0 else int(state["first_step"])
        self.last_step = None if state["last_step"] < 0 else int(state["last_step"])
        self.n_updates, self.n_ids = int(state["n_updates"]), int(state["n_ids"])

    def table(self, n_items: int) -> torch.Tensor:
        """log probability for item indices 0..n_items -> (n_items + 1,) float32, e.g. for ``TwoTower.set_log_q``."""
        return self.log_probability(torch.arange(n_items + 1))


def exact_log_q(counts: torch.Tensor, min_count: float = 1.0) -> torch.Tensor:
    """Per-example log sampling probability from exact counts: counts (n,) -> (n,) float32.

    log(max(count, min_count) / total): items never seen (and the padding row) get the floor instead of
    log 0 = -inf, which would turn their logits into +inf.
    """
    if counts.dim() != 1 or counts.numel() == 0:
        raise FrequencyError(f"counts must be a non-empty (n,) tensor, got shape {tuple(counts.shape)}")
    if (counts < 0).any() or min_count <= 0:
        raise FrequencyError("counts must be >= 0 and min_count > 0")
    total = float(counts.sum())
    if total <= 0:
        raise FrequencyError("counts sum to zero: no item was seen")
    return (counts.double().clamp(min=min_count) / total).log().float()
