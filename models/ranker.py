"""The ranking model: TransAct (models/transact.py) + DCN v2 (models/dcn.py) with one head per action.

Item features are the candidate release's item vectors, a frozen ``(n_items + 1, D)`` table (row 0 = padding /
unknown), projected to ``item_dim`` and optionally summed with a learned item-id embedding. A ranker is therefore
bound to one release: ``save_ranker`` records the release id and a fingerprint of the table, and ``load_ranker``
refuses a table that is not the one it was trained on.

Affinity features (``RankerConfig.affinity_features``, with the sequence): the candidate's cosine with the mean and
the max of the sequence's positive and negative actions' item vectors (``affinity_features``), 4 numbers beside
TransAct in the DCN input, computed here from the batch, so training, evaluation and serving get them alike; in
training they see the same time-window mask as TransAct. A ranker saved before the flag loads with it False.

Retrieval score (``RankerConfig.retrieval_score``): ``u . v`` of the candidate, ``u`` the retriever's user vector at
the request (the one ``/recommend``'s first stage searched the index with; tasks/request_vectors.py for training
rows) and ``v`` the candidate's row of the frozen item table (the release's item embedding: the index's score), plus
whether the request has a ``u`` at all (``retrieval_features``). The ranker otherwise never sees what the retriever
thinks, and among 200 retrieved candidates, all close to the user, its own order lost to the retriever's. Computed
here from ``RankerBatch.user_vector``, so every candidate gets it alike, whichever generator found it. A ranker
saved before the flag loads with it False.

Heads: ``RANKER_HEADS`` (click, save, conversion, skip, hide), trained with weighted binary cross-entropy
(``ranker_loss``); ``blended_score`` turns the head probabilities into one ranking score with configurable
weights, hide and skip negative. ``Ranker.ranking_score``, what requests are ranked by, adds
``RankerConfig.retrieval_weight`` x the retrieval score ``u . v``: the heads learn P(engaged | shown) from the
slates users were shown, which says nothing of which of /recommend's 200 retrieved candidates a user would have been
shown and engaged with; the retriever, trained on engagements, does (README "Ranking", two-stage quality).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from towerflow.config import RANKER_HEADS, RankerConfig
from towerflow.contract import ACTIONS, NEGATIVE_ACTIONS, POSITIVE_ACTIONS, SURFACES
from towerflow.errors import TowerflowError
from towerflow.models.dcn import DCNv2
from towerflow.models.transact import TransAct, window_mask

FORMAT, FORMAT_VERSION = "towerflow-ranker", 1
CONFIG_FILE, WEIGHTS_FILE = "ranker.json", "ranker.pt"
N_ACTIONS = len(ACTIONS)  # contract ACTIONS, coded 1..6 by tasks/history.py's ACTION_INDEX (0 = padding)
POSITIVE_CODES = tuple(ACTIONS.index(a) + 1 for a in POSITIVE_ACTIONS)  # ACTION_INDEX codes (click, save, conversion)
NEGATIVE_CODES = tuple(ACTIONS.index(a) + 1 for a in NEGATIVE_ACTIONS)  # skip, hide
N_AFFINITY = 4
N_RETRIEVAL = 2
N_RECENCY = 2


class RankerFileError(TowerflowError):
    """A saved ranker cannot be used: wrong format, or trained on another release's item vectors."""


@dataclass
class RankerBatch:
    """One batch of (request, candidate) rows; the sequence is the user's actions strictly before the request."""

    cand_items: torch.Tensor  # (B,) int64 item indices of the release vocabulary
    surface: torch.Tensor  # (B,) int64 SURFACE_INDEX
    hist_items: torch.Tensor  # (B, S) or (1, S) shared by all rows; int64, 0 = padding, latest last
    hist_actions: torch.Tensor  # (B, S) int64 ACTION_INDEX, 0 = padding
    hist_age_s: torch.Tensor  # (B, S) float32 seconds between each action and the request
    dense: torch.Tensor | None = None  # (B, dense_dim) float32 request features (e.g. a user profile vector)
    # (B, D) or (1, D) float32 the retriever's user vector at the request (0: none), with retrieval_score
    user_vector: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> RankerBatch:
        return RankerBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                              for f in fields(self)})


def affinity_features(item_vectors: torch.Tensor, cand_items: torch.Tensor, hist_items: torch.Tensor,
                      hist_actions: torch.Tensor) -> torch.Tensor:
    """The candidate against the user's sequence, in numbers the DCN can use directly (the sequence module sees the
    item vectors only through learned projections, and the flow's ranker lost to ``profile_dot`` without them).

    item_vectors (n_items + 1, D) the frozen table; cand_items (B,); hist_items, hist_actions (B, S) or (1, S) (one
    sequence for every row, broadcast), 0 = padding. Returns (B, 4) float: for the positive actions (click, save,
    conversion), then the negative ones (skip, hide): cos(candidate, mean of their item vectors) and the max cos(candidate, one of their
    items); 0 where the sequence has no such action. Impressions and padding take no part.
    """
    cand = F.normalize(item_vectors[cand_items], dim=-1)  # (B, D); normalize maps a zero row to zeros
    hist = item_vectors[hist_items]  # (Bh, S, D), Bh = B or 1
    if hist.shape[0] == 1:  # one sequence for every row: (B, D) @ (D, S), no (B, S, D) copy
        cos = cand @ F.normalize(hist[0], dim=-1).T  # (B, S)
    else:
        cos = torch.einsum("bd,bsd->bs", cand, F.normalize(hist, dim=-1))
    out = []
    for codes in (POSITIVE_CODES, NEGATIVE_CODES):
        mask = torch.isin(hist_actions, torch.tensor(codes, device=hist_actions.device))  # (B or 1, S)
        has = mask.any(dim=1, keepdim=True)  # (B or 1, 1)
        mean = (hist * mask[..., None]).sum(dim=1)  # (B or 1, D); the sum has the mean's direction
        out.append((cand * F.normalize(mean, dim=-1)).sum(dim=-1, keepdim=True))  # (B, 1); 0 without actions
        best = cos.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
        out.append(torch.where(has, best, torch.zeros_like(best)))
    return torch.cat(out, dim=-1)


def retrieval_features(item_vectors: torch.Tensor, cand_items: torch.Tensor, user_vector: torch.Tensor) -> torch.Tensor:
    """The retriever's opinion of each candidate: (B, 2) = [u . v, 1 if the request has a u else 0].

    item_vectors (n_items + 1, D) the frozen table (the release's item embeddings, row 0 zeros: an unknown item scores
    0); cand_items (B,); user_vector (B, D) or (1, D) (one request's u for every row, broadcast), a zero row where
    serving had no u (a user with no history and no viewed item).
    """
    score = (item_vectors[cand_items] * user_vector).sum(dim=-1, keepdim=True)  # (B, 1)
    has = (user_vector != 0).any(dim=-1, keepdim=True).to(score.dtype).expand_as(score)  # (B, 1)
    return torch.cat([score, has], dim=-1)


def recency_features(actions: torch.Tensor, age_s: torch.Tensor) -> torch.Tensor:
    """How long ago the user last acted: (B, 2) = [log(1 + age of the latest action in seconds) / 10, 1 if the
    sequence has an action else 0] (0, 0 without one). actions, age_s (B, S) or (1, S), 0 = padding (in training,
    after the time-window mask: a hidden action is not the latest). Why: TransAct has no positions or times, so
    without it the ranker cannot tell an ongoing session (seconds) from a new one (hours), whose topic the last
    actions do not tell."""
    valid = actions > 0
    has = valid.any(dim=1, keepdim=True)  # (B, 1)
    latest = age_s.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)  # (B, 1)
    scaled = torch.where(has, torch.log1p(latest.clamp_min(0.0)) / 10, torch.zeros_like(latest))
    return torch.cat([scaled, has.to(scaled.dtype)], dim=-1)


def table_fingerprint(item_vectors: torch.Tensor | np.ndarray) -> str:
    """sha256 of the item-vector table's float32 bytes and shape: what binds a ranker to its release."""
    a = np.ascontiguousarray(np.asarray(item_vectors, dtype=np.float32))
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


class Ranker(nn.Module):
    """TransAct + DCN v2; ``forward`` returns (B, len(RANKER_HEADS)) logits."""

    def __init__(self, item_vectors: torch.Tensor, cfg: RankerConfig, dense_dim: int = 0):
        super().__init__()
        if item_vectors.ndim != 2 or item_vectors.shape[0] < 2:
            raise ValueError(f"ranker: item_vectors must be (n_items + 1, dim), got {tuple(item_vectors.shape)}")
        self.cfg, self.dense_dim = cfg, dense_dim
        self.register_buffer("item_vectors", item_vectors.detach().float().clone(), persistent=False)  # frozen
        self.item_proj = nn.Linear(item_vectors.shape[1], cfg.item_dim)
        self.item_id = (nn.Embedding(item_vectors.shape[0], cfg.item_dim, padding_idx=0)
                        if cfg.item_id_embedding else None)
        if self.item_id is not None:
            nn.init.normal_(self.item_id.weight, std=0.01)
        self.surface = nn.Embedding(len(SURFACES), cfg.surface_dim)
        self.sequence = TransAct(N_ACTIONS, cfg.item_dim, cfg) if cfg.use_sequence else None
        self.affinity = cfg.use_sequence and cfg.affinity_features  # features of the sequence: none without it
        self.recency = cfg.use_sequence and cfg.recency_feature
        in_dim = (cfg.item_dim + cfg.surface_dim + dense_dim + (self.sequence.out_dim if self.sequence else 0)
                  + (N_AFFINITY if self.affinity else 0) + (N_RETRIEVAL if cfg.retrieval_score else 0)
                  + (N_RECENCY if self.recency else 0))
        self.dcn = DCNv2(in_dim, cfg.cross_layers, cfg.cross_rank, tuple(cfg.mlp_hidden), cfg.structure,
                         cfg.dropout)
        self.heads = nn.Linear(self.dcn.out_dim, len(RANKER_HEADS))

    @property
    def n_items(self) -> int:
        return self.item_vectors.shape[0] - 1

    def item_repr(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) int64 -> (..., item_dim)."""
        v = self.item_proj(self.item_vectors[items])
        return v + self.item_id(items) if self.item_id is not None else v

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        """-> (B, H) logits, H = len(RANKER_HEADS)."""
        cand = self.item_repr(batch.cand_items)  # (B, di)
        parts = [cand, self.surface(batch.surface)]
        if self.dense_dim:
            if batch.dense is None or batch.dense.shape[-1] != self.dense_dim:
                got = None if batch.dense is None else tuple(batch.dense.shape)
                raise ValueError(f"ranker: expects dense features of width {self.dense_dim}, got {got}")
            parts.append(batch.dense)
        actions, age = batch.hist_actions, batch.hist_age_s
        if self.sequence is not None and not self.training and batch.hist_items.shape[0] == 1:
            # one user's candidates (score_candidates): the sequence's share of the work is done once
            seq = self.item_repr(batch.hist_items[0])  # (S, di)
            parts.append(self.sequence.forward_shared(actions[0], seq, cand))
        elif self.sequence is not None:
            # hist_* may have batch size 1 for one user's candidates: project once, broadcast.
            b = cand.shape[0]
            seq = self.item_repr(batch.hist_items).expand(b, -1, -1)  # (B, S, di)
            actions, age = actions.expand(b, -1), batch.hist_age_s.expand(b, -1)
            if self.training and self.cfg.time_window_s > 0 and self.cfg.time_window_prob > 0:
                # one window mask for TransAct and the affinity: neither may lean on the last seconds alone
                actions = actions * window_mask(age, actions > 0, self.cfg.time_window_s, self.cfg.time_window_prob)
            parts.append(self.sequence(actions, seq, cand, age, window=False))
        if self.affinity:  # hist_items (1, S) broadcasts against per-row actions: same numbers as per row
            parts.append(affinity_features(self.item_vectors, batch.cand_items, batch.hist_items, actions))
        if self.recency:  # (1, S) on the shared path: one request, the same numbers for every candidate
            parts.append(recency_features(actions, age).expand(cand.shape[0], -1))
        if self.cfg.retrieval_score:
            if batch.user_vector is None or batch.user_vector.shape[-1] != self.item_vectors.shape[1]:
                got = None if batch.user_vector is None else tuple(batch.user_vector.shape)
                raise ValueError(f"ranker: retrieval_score needs the retriever's user vector of width "
                                 f"{self.item_vectors.shape[1]} per request (RankerBatch.user_vector), got {got}")
            parts.append(retrieval_features(self.item_vectors, batch.cand_items, batch.user_vector))
        return self.heads(self.dcn(torch.cat(parts, dim=-1)))

    def ranking_score(self, probs: torch.Tensor, cand_items: torch.Tensor,
                      user_vector: torch.Tensor | None = None,
                      unknown_uv: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) what requests are ranked by: ``blended_score`` of the head probabilities ``probs`` (B, H) with
        ``cfg.score_weights``, plus ``cfg.retrieval_weight`` x the retriever's ``u . v`` of each candidate
        (cand_items (B,), user_vector (B, D) or (1, D), as in ``RankerBatch``; needed only with that weight).
        ``unknown_uv`` (B,): the ``u . v`` the first stage found each candidate with, used where the ranker's item
        table has no row for it (index 0: an item added to the served index after the release, whose table row
        is zeros), so such an item is not ranked as if the retriever scored it 0."""
        uv = None
        if self.cfg.retrieval_weight:
            if user_vector is None:
                raise ValueError("ranker: retrieval_weight needs the retriever's user vector of each request")
            uv = retrieval_features(self.item_vectors, cand_items, user_vector)[:, 0]
            if unknown_uv is not None:
                uv = torch.where(cand_items == 0, unknown_uv.to(uv.dtype), uv)
        return blended_score(probs, self.cfg.score_weights, uv, self.cfg.retrieval_weight)

def ranker_loss(logits: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """Weighted binary cross-entropy: ``sum_h w_h * mean_rows BCE(logit_h, y_h) / sum_h w_h``.

    logits, labels: (B, H) in RANKER_HEADS order; heads missing from ``weights`` weigh 0.
    """
    w = torch.tensor([weights.get(h, 0.0) for h in RANKER_HEADS], dtype=logits.dtype, device=logits.device)
    per_head = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)  # (H,)
    return (per_head * w).sum() / w.sum().clamp_min(1e-12)


def blended_score(probs: torch.Tensor, weights: dict[str, float], retrieval: torch.Tensor | None = None,
                  retrieval_weight: float = 0.0) -> torch.Tensor:
    """(B, H) head probabilities -> (B,) ``sum_h weights[h] * p_h`` (hide and skip take negative weights), plus
    ``retrieval_weight * retrieval`` where ``retrieval`` (B,) is each row's retrieval score ``u . v``."""
    w = torch.tensor([weights.get(h, 0.0) for h in RANKER_HEADS], dtype=probs.dtype, device=probs.device)
    score = probs @ w
    if retrieval_weight:
        if retrieval is None:
            raise ValueError("blended_score: a retrieval_weight needs each row's retrieval score u . v")
        score = score + retrieval_weight * retrieval.to(score.dtype)
    return score


@torch.no_grad()
def score_candidates(model: Ranker, cand_items: np.ndarray, surface: int, hist_items: np.ndarray,
                     hist_actions: np.ndarray, hist_age_s: np.ndarray, dense: np.ndarray | None = None,
                     user_vector: np.ndarray | None = None, unknown_uv: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Rank one request: C candidates against one user's sequence -> (probs (C, H), ranking scores (C,)).

    cand_items (C,) item indices; hist_* (S,) the user's sequence as in ``RankerBatch``; dense (dense_dim,);
    user_vector (D,) the retriever's u of the request (zeros: none), for a ranker with ``retrieval_score``;
    unknown_uv (C,) the first stage's scores, for candidates the item table lacks (``Ranker.ranking_score``).
    """
    c = len(cand_items)
    batch = RankerBatch(
        cand_items=torch.as_tensor(cand_items, dtype=torch.int64),
        surface=torch.full((c,), int(surface), dtype=torch.int64),
        # (1, S): one sequence shared by the C rows
        hist_items=torch.as_tensor(np.ascontiguousarray(hist_items), dtype=torch.int64)[None],
        hist_actions=torch.as_tensor(np.ascontiguousarray(hist_actions), dtype=torch.int64)[None],
        hist_age_s=torch.as_tensor(np.ascontiguousarray(hist_age_s), dtype=torch.float32)[None],
        dense=None if dense is None else torch.as_tensor(dense, dtype=torch.float32)[None].expand(c, -1),
        user_vector=None if user_vector is None else torch.as_tensor(user_vector, dtype=torch.float32)[None],
    )
    model.eval()
    probs = torch.sigmoid(model(batch))
    uv = None if unknown_uv is None else torch.as_tensor(unknown_uv, dtype=torch.float32)
    return probs.numpy(), model.ranking_score(probs, batch.cand_items, batch.user_vector, uv).numpy()


def save_ranker(model: Ranker, directory: str | Path, release_id: str) -> Path:
    """Write ``ranker.json`` (config, sizes, release id, item-table fingerprint) and ``ranker.pt`` (weights,
    without the frozen item table: the release holds it). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "release_id": release_id,
            "item_table": {"shape": list(model.item_vectors.shape),
                           "sha256": table_fingerprint(model.item_vectors.cpu())},
            "dense_dim": model.dense_dim, "ranker_config": model.cfg.model_dump(mode="json")}
    for name, write in ((WEIGHTS_FILE, lambda p: torch.save({k: v.detach().cpu() for k, v in
                                                              model.state_dict().items()}, p)),
                        (CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))):
        tmp = directory / (name + ".tmp")  # write then rename: a crash never leaves half a file under the name
        write(tmp)
        os.replace(tmp, directory / name)
    return directory


def load_ranker(directory: str | Path, item_vectors: torch.Tensor | np.ndarray,
                release_id: str | None = None) -> Ranker:
    """Read a ranker written by ``save_ranker`` over the release's ``item_vectors`` -> Ranker in eval mode.

    Raises RankerFileError when the format differs, when ``release_id`` is given and is not the ranker's, or when
    ``item_vectors`` are not the table the ranker was trained on.
    """
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise RankerFileError(f"{directory / CONFIG_FILE}: format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
    if release_id is not None and meta["release_id"] != release_id:
        raise RankerFileError(f"{directory}: ranker of release {meta['release_id']}, not of release {release_id}")
    table = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32))
    if table_fingerprint(table) != meta["item_table"]["sha256"]:
        raise RankerFileError(
            f"{directory}: item vectors {tuple(table.shape)} are not the table the ranker was trained on "
            f"({tuple(meta['item_table']['shape'])}, release {meta['release_id']})")
    with torch.random.fork_rng(devices=[]):  # init draws are overwritten; leave the caller's RNG alone
        # a ranker saved before affinity_features / retrieval_score existed was trained without them
        cfg = RankerConfig.model_validate({"affinity_features": False, "retrieval_score": False,
                                           "recency_feature": False, **meta["ranker_config"]})
        model = Ranker(table, cfg, int(meta["dense_dim"]))
    try:
        model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    except RuntimeError as exc:
        raise RankerFileError(f"{directory / WEIGHTS_FILE}: weights do not fit the saved config: {exc}") from exc
    return model.eval()
