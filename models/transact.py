"""TransAct (Pinterest, KDD 2023): a small transformer over the user's realtime action sequence, fused early with
the candidate item.

Each of the last S actions is ``[action-type embedding, engaged item's vector, candidate item's vector]`` (early
fusion: every token sees the candidate), read by a transformer encoder (2 layers, 1 head, feed-forward 32) and
compressed to a max-pool over the valid positions plus the latest K positions, flattened.

Two things Pinterest's reference module gets wrong are handled here: action id 0 is padding and no real action
has it (``tasks/history.py`` codes actions from 1), and padding takes part neither in attention (key padding mask)
nor in the max-pool. In training, a random time window before the request is masked (see ``window_mask``).
No positional encoding, as in the reference: order enters through the latest-K block, which keeps positions apart.
"""

from __future__ import annotations

import torch
from torch import nn

from towerflow.config import RankerConfig


def window_mask(age_s: torch.Tensor, valid: torch.Tensor, window_s: float, prob: float) -> torch.Tensor:
    """The training-time random time-window mask: which valid actions stay visible.

    Each row, with probability ``prob``, draws a window ``w ~ U(0, window_s)`` and hides its actions younger than
    ``w`` seconds at the request, so the model cannot lean on the last seconds alone (TransAct section 3.3).

    age_s: (B, S) seconds between each action and the request; valid: (B, S) bool. Returns (B, S) bool.
    """
    b = age_s.shape[0]
    w = torch.rand(b, 1, device=age_s.device) * window_s
    on = torch.rand(b, 1, device=age_s.device) < prob
    return valid & ~(on & (age_s < w))


class TransAct(nn.Module):
    """Sequence module: (actions, item vectors, candidate vector, ages) -> (B, (1 + K) * d_model) features."""

    def __init__(self, n_actions: int, item_dim: int, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        self.action = nn.Embedding(n_actions + 1, cfg.action_dim, padding_idx=0)  # 0 = padding, never an action
        self.d_model = cfg.action_dim + 2 * item_dim
        if self.d_model % cfg.n_heads:
            raise ValueError(f"ranker: d_model {self.d_model} (action_dim + 2 x item_dim) is not divisible by "
                             f"n_heads {cfg.n_heads}")
        layer = nn.TransformerEncoderLayer(self.d_model, cfg.n_heads, dim_feedforward=cfg.ff_dim,
                                           dropout=cfg.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.out_dim = self.d_model * (1 + cfg.latest_k)

    def forward(self, actions: torch.Tensor, item_vecs: torch.Tensor, cand_vec: torch.Tensor,
                age_s: torch.Tensor) -> torch.Tensor:
        """actions (B, S) int64, 0 = padding, latest last; item_vecs (B, S, di); cand_vec (B, di);
        age_s (B, S) float seconds before the request. Returns (B, (1 + K) * d_model)."""
        b, s = actions.shape
        k = self.cfg.latest_k
        if s < k:
            raise ValueError(f"ranker: sequences of length {s} are shorter than latest_k {k}")
        valid = actions > 0
        if self.training and self.cfg.time_window_s > 0 and self.cfg.time_window_prob > 0:
            valid = window_mask(age_s, valid, self.cfg.time_window_s, self.cfg.time_window_prob)
        # Leading columns that are padding in every row change nothing (masked keys, zeroed and unpooled outputs):
        # drop them, keeping the latest K, so short histories cost what they hold.
        cols = valid.any(dim=0).nonzero()
        first = min(int(cols[0]) if len(cols) else s, s - k)
        if first > 0:
            actions, item_vecs, valid, s = actions[:, first:], item_vecs[:, first:], valid[:, first:], s - first
        tokens = torch.cat([self.action(actions * valid), item_vecs,
                            cand_vec[:, None, :].expand(b, s, cand_vec.shape[-1])], dim=-1)  # (B, S, d)
        has = valid.any(dim=1)  # (B,)
        # A row with no visible action would attend to nothing (NaN): let it attend to its last slot and zero it.
        pad = ~valid
        pad[:, -1] &= has
        h = self.encoder(tokens, src_key_padding_mask=pad)  # (B, S, d)
        h = h * valid[..., None]
        pooled = h.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)  # (B, d) over valid positions only
        pooled = torch.where(has[:, None], pooled, torch.zeros_like(pooled))
        latest = h[:, s - k :, :].reshape(b, k * self.d_model)  # (B, K * d)
        return torch.cat([pooled, latest], dim=-1)
