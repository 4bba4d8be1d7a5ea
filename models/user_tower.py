"""The user tower, split in two so serving can be hybrid (docs/architecture.md, "Serving").

- ``encode_history`` (offline, cacheable): the last L actions as tokens = item vector + action-type embedding +
  time-gap bucket embedding + learned position; pre-norm Transformer encoder blocks; pooled as max-pool over
  valid tokens concatenated with the latest ``latest_tokens`` tokens (TransAct). Output ``h`` (b, history_dim).
- ``combine`` (online, per request): the context layer. The viewed item and the surface, the search query's token
  bag (``use_query``; embedded by the item tower's text encoder), demographic embeddings, and ``h`` -> MLP -> unit
  vector ``u`` (b, dim). The query is online only: ``encode_history`` never sees it.

Rows with no history at all (new users) get ``h = 0``, so serving can use zeros for a user it has never seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from towerflow.config import ModelConfig
from towerflow.errors import TowerflowError
from towerflow.models.batch import N_ACTIONS, N_SURFACES, POSITIVE_ACTION_IDS, FeatureSizes
from towerflow.models.item_tower import ItemTower
from towerflow.models.layers import EncoderBlock, FastDropout, mlp, small_embedding


class UserTowerInputError(TowerflowError, ValueError):
    """A batch does not fit the user tower: shapes, history length, or an id outside its vocabulary."""


class UserTower(nn.Module):
    """History encoder + context layer. Shares ``item_tower`` to represent history and context items."""

    def __init__(self, sizes: FeatureSizes, cfg: ModelConfig, item_tower: ItemTower):
        super().__init__()
        self.sizes, self.cfg = sizes, cfg
        d = cfg.d_model
        # Shared with TwoTower: history and context items are embedded by the tower that embeds candidates.
        self.item_tower = item_tower
        self.hist_item_proj = nn.Linear(cfg.dim, d)
        self.action_emb = nn.Embedding(N_ACTIONS, d, padding_idx=0)
        self.gap_emb = nn.Embedding(cfg.gap_buckets, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)  # position 0 = the latest action
        self.token_drop = FastDropout(cfg.dropout)
        self.register_buffer("positive_actions", torch.tensor(POSITIVE_ACTION_IDS), persistent=False)
        self.blocks = nn.ModuleList(EncoderBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(d)
        # h = [max-pool, latest tokens, (with history_residual) mean of positively engaged item vectors]
        self.history_dim = (1 + cfg.latest_tokens) * d + (cfg.dim if cfg.history_residual else 0)

        if cfg.use_context:
            self.context_item_proj = nn.Linear(cfg.dim, d)
            self.no_context = nn.Parameter(torch.zeros(d))
            self.surface_emb = nn.Embedding(N_SURFACES, d)
        self.demo_embs = nn.ModuleList(nn.Embedding(c + 1, d) for c in sizes.demographic_cardinalities)
        if cfg.use_query:
            self.query_proj = nn.Linear(d, d)
            self.no_query = nn.Parameter(torch.zeros(d))
        in_dim = (self.history_dim + (2 * d if cfg.use_context else 0) + (d if cfg.use_query else 0)
                  + d * len(self.demo_embs))
        self.mlp = mlp(in_dim, cfg.hidden, cfg.dim, cfg.dropout)
        if cfg.history_residual:
            # The mean of the vectors of items the user engaged with, added (gated) to the output, as in YouTube's
            # averaged watch vectors: from the first step u points at the user's own items, so the model does not
            # have to escape a collapsed state (every user the same vector) before the encoder has learned anything.
            self.history_out = nn.Linear(cfg.dim, cfg.dim)
            with torch.no_grad():
                self.history_out.weight.copy_(torch.eye(cfg.dim))
                self.history_out.bias.zero_()
            self.history_gate = nn.Linear(in_dim, 1)
        if cfg.use_context and cfg.context_residual:
            # A direct path from the viewed item to the output: on `related` the next engagement is usually a
            # neighbour of the viewed item, i.e. near its own vector; through the MLP alone, the concatenated
            # history dominates and the model learns that only slowly. The gate lets each request weigh it.
            self.context_out = nn.Linear(cfg.dim, cfg.dim)
            with torch.no_grad():
                self.context_out.weight.copy_(torch.eye(cfg.dim))
                self.context_out.bias.zero_()
            self.context_gate = nn.Linear(in_dim, 1)
        if cfg.use_query and cfg.query_residual:
            # A direct path from the query's words to the output, as for the viewed item: on `search` the query
            # names the topic the next engagement is in, which the history-heavy MLP input learns only slowly.
            self.query_out = nn.Linear(d, cfg.dim)
            self.query_gate = nn.Linear(in_dim, 1)

    def encode_history(
        self,
        hist_items: torch.Tensor,
        hist_actions: torch.Tensor,
        hist_gaps: torch.Tensor,
        hist_vecs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode left-padded histories (b, L) long -> h (b, history_dim).

        ``hist_items == 0`` marks padding. ``hist_vecs`` (b, L, dim) are the item tower's vectors for
        ``hist_items`` when the caller already has them (TwoTower computes the item tower once per batch over
        the unique items); otherwise they are computed here.
        """
        b, seq_len = hist_items.shape
        if hist_actions.shape != (b, seq_len) or hist_gaps.shape != (b, seq_len):
            raise UserTowerInputError(
                f"hist_items {tuple(hist_items.shape)}, hist_actions {tuple(hist_actions.shape)} and "
                f"hist_gaps {tuple(hist_gaps.shape)} must have the same (b, L) shape"
            )
        if not 1 <= seq_len <= self.cfg.max_seq_len:
            raise UserTowerInputError(
                f"history length {seq_len} is outside [1, max_seq_len={self.cfg.max_seq_len}]"
            )
        _check_range("hist_gaps (time-gap buckets)", hist_gaps, self.cfg.gap_buckets)
        _check_range("hist_actions", hist_actions, N_ACTIONS)
        if hist_vecs is None:
            hist_vecs = _unique_item_vectors(self.item_tower, hist_items)
        pad = hist_items == 0  # (b, L) True = padding
        # Positions count back from the latest action (left padding puts it in the last column), so one table
        # serves every history length up to max_seq_len.
        pos = torch.arange(seq_len - 1, -1, -1, device=hist_items.device)
        x = (self.hist_item_proj(hist_vecs) + small_embedding(self.action_emb, hist_actions)
             + small_embedding(self.gap_emb, hist_gaps))
        x = self.token_drop(x + self.pos_emb(pos))  # (b, L, d)

        # A row with every key masked makes attention 0/0 = NaN; let such rows (new users) attend to their last
        # slot and discard what comes out below.
        empty = pad.all(dim=1)  # (b,)
        attend = ~pad
        attend[:, -1] |= empty
        for block in self.blocks:
            x = block(x, attend)  # (b, L, d)
        x = self.ln_out(x)  # (b, L, d); padded slots hold garbage, masked below where read

        # padding out of the max as an added -inf per slot: a broadcast masked_fill costs 6x an add here
        no_pad = torch.where(pad, float("-inf"), 0.0).to(x.dtype).unsqueeze(-1)  # (b, L, 1)
        pooled = (x + no_pad).amax(dim=1)  # (b, d)
        pooled = pooled.masked_fill(empty.unsqueeze(-1), 0.0)
        k = self.cfg.latest_tokens
        latest = x[:, -k:, :].masked_fill(pad[:, -k:].unsqueeze(-1), 0.0)  # (b, min(k, L), d), padded slots 0
        if seq_len < k:
            latest = F.pad(latest, (0, 0, k - seq_len, 0))
        parts = [pooled, latest.reshape(b, k * x.shape[-1])]
        if self.cfg.history_residual:
            positive = torch.isin(hist_actions, self.positive_actions) & ~pad  # (b, L)
            w = positive.to(hist_vecs.dtype).unsqueeze(-1)
            parts.append((hist_vecs * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0))  # (b, dim), 0 if none
        return torch.cat(parts, dim=-1)  # (b, history_dim)

    def combine(
        self,
        h: torch.Tensor,
        context_items: torch.Tensor,
        surface: torch.Tensor,
        user_feats: torch.Tensor,
        context_vecs: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The context layer: h (b, history_dim), context_items (b,), surface (b,), user_feats (b, F),
        query (b, T) token hashes or None -> u (b, dim).

        ``context_items == 0`` means no viewed item: a learned no-context vector stands in. In training the
        viewed item is replaced by that vector with probability ``context_dropout`` (the surface, always known
        at request time, is kept). With ``use_context=False`` the context arguments are ignored.
        ``context_vecs`` (b, dim) are the item tower's vectors for ``context_items`` if already computed.
        A row of ``query`` without tokens (or ``query=None``) means no query: a learned no-query vector stands in;
        in training the whole query is dropped with probability ``query_dropout``.
        """
        if user_feats.dim() != 2 or user_feats.shape[1] != len(self.demo_embs):
            raise UserTowerInputError(
                f"user_feats must be (b, {len(self.demo_embs)}), got shape {tuple(user_feats.shape)}"
            )
        if h.dim() != 2 or h.shape[1] != self.history_dim:
            raise UserTowerInputError(f"h must be (b, {self.history_dim}), got shape {tuple(h.shape)}")
        for i, card in enumerate(self.sizes.demographic_cardinalities):
            _check_range(f"user_feats[:, {i}]", user_feats[:, i], card + 1)
        if self.cfg.use_context:
            _check_range("surface", surface, N_SURFACES)
        if self.cfg.use_query and query is not None and (query.dim() != 2 or query.shape[0] != h.shape[0]):
            raise UserTowerInputError(f"query must be (b={h.shape[0]}, T), got shape {tuple(query.shape)}")
        return self.context_layer(h, context_items, surface, user_feats, context_vecs, query)

    def context_layer(self, h: torch.Tensor, context_items: torch.Tensor, surface: torch.Tensor,
                      user_feats: torch.Tensor, context_vecs: torch.Tensor | None = None,
                      query: torch.Tensor | None = None) -> torch.Tensor:
        """``combine`` without its input checks (shapes and id ranges as ``combine`` checks them): what serving
        traces into one graph (serving/retrieval.py ``trace_combine``), whose inputs are the release's own codes."""
        parts = [h]
        if self.cfg.use_context:
            if context_vecs is None:
                context_vecs = _unique_item_vectors(self.item_tower, context_items)
            use = context_items > 0
            if self.training and self.cfg.context_dropout > 0:
                use = use & (torch.rand(use.shape, device=use.device) >= self.cfg.context_dropout)
            ctx = torch.where(use.unsqueeze(-1), self.context_item_proj(context_vecs), self.no_context)
            parts += [ctx, self.surface_emb(surface)]
        if self.cfg.use_query:
            if query is None:
                query = torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device)
            has_query = (query > 0).any(dim=1)  # (b,)
            if self.training and self.cfg.query_dropout > 0:
                has_query = has_query & (torch.rand(has_query.shape, device=h.device) >= self.cfg.query_dropout)
            qbag = self.item_tower.text_encoder(query)  # (b, d), the space of the items' text
            parts.append(torch.where(has_query.unsqueeze(-1), self.query_proj(qbag), self.no_query))
        parts += [emb(user_feats[:, i]) for i, emb in enumerate(self.demo_embs)]
        x = torch.cat(parts, dim=-1)  # (b, in_dim)
        out = self.mlp(x)  # (b, dim)
        if self.cfg.history_residual:
            mean = h[:, -self.cfg.dim :]  # (b, dim), see encode_history
            out = out + torch.sigmoid(self.history_gate(x)) * self.history_out(mean)
        if self.cfg.use_context and self.cfg.context_residual:
            gate = torch.sigmoid(self.context_gate(x)) * use.unsqueeze(-1)  # (b, 1), 0 without a viewed item
            out = out + gate * self.context_out(context_vecs)
        if self.cfg.use_query and self.cfg.query_residual:
            gate = torch.sigmoid(self.query_gate(x)) * has_query.unsqueeze(-1)  # (b, 1), 0 without a query
            out = out + gate * self.query_out(qbag)
        return F.normalize(out, dim=-1)

    def forward(
        self,
        hist_items: torch.Tensor,
        hist_actions: torch.Tensor,
        hist_gaps: torch.Tensor,
        context_items: torch.Tensor,
        surface: torch.Tensor,
        user_feats: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """encode_history then combine -> u (b, dim)."""
        h = self.encode_history(hist_items, hist_actions, hist_gaps)
        return self.combine(h, context_items, surface, user_feats, query=query)


def _check_range(name: str, t: torch.Tensor, end: int) -> None:
    """Raise UserTowerInputError unless every value of t is in [0, end) (instead of an opaque index error)."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= end):
        raise UserTowerInputError(f"{name} must be in [0, {end}), got [{int(t.min())}, {int(t.max())}]")


def _unique_item_vectors(item_tower: ItemTower, idx: torch.Tensor) -> torch.Tensor:
    """item_tower over the unique indices of idx (...), gathered back -> (..., dim)."""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    return item_tower(uniq)[inverse]
