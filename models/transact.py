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

    # forward_shared: about this many tokens (candidates x S) per block; measured on 1 thread: 50 candidates at S = 100
    # beat 16, 32, 100 and 200, and 200 at S = 32 beat smaller blocks
    TOKEN_BLOCK = 6400

    def forward(self, actions: torch.Tensor, item_vecs: torch.Tensor, cand_vec: torch.Tensor,
                age_s: torch.Tensor, window: bool = True) -> torch.Tensor:
        """actions (B, S) int64, 0 = padding, latest last; item_vecs (B, S, di); cand_vec (B, di);
        age_s (B, S) float seconds before the request. Returns (B, (1 + K) * d_model). ``window`` False: the caller
        applied the training-time window mask already (the Ranker masks the actions once for every feature)."""
        b, s = actions.shape
        k = self.cfg.latest_k
        if s < k:
            raise ValueError(f"ranker: sequences of length {s} are shorter than latest_k {k}")
        valid = actions > 0
        if window and self.training and self.cfg.time_window_s > 0 and self.cfg.time_window_prob > 0:
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

    @torch.no_grad()
    def forward_shared(self, actions: torch.Tensor, item_vecs: torch.Tensor, cand_vec: torch.Tensor) -> torch.Tensor:
        """Eval only: ONE sequence against C candidates (serving) -> (C, (1 + K) * d_model), what ``forward`` gives
        for the sequence repeated C times (up to float rounding), at a fraction of its cost.

        actions (S,) int64; item_vecs (S, di); cand_vec (C, di). Early fusion makes every token depend on the
        candidate, but the first layer is linear in the token until its softmax: its input projections are split into
        the sequence's part (once) and the candidate's part (once per candidate); in the attention scores
        ``(q_s + qc)(k_t + kc)`` the terms without t cancel in the softmax, leaving ``A[s, t] + B[c, t]`` (A: S x S
        once, B: C x S), whose exponentials multiply; the values' candidate part adds after the softmax (its weights
        sum to 1), and the output projection folds into the values. The first layer's mixing is then ONE matrix
        product (C x S) @ (S x S * d); later layers run in full. A request whose softmax would underflow in that
        split form is computed the plain way (``_forward_plain``).
        """
        c, s, k = cand_vec.shape[0], actions.shape[0], self.cfg.latest_k
        if s < k:
            raise ValueError(f"ranker: sequences of length {s} are shorter than latest_k {k}")
        layers = list(self.encoder.layers)
        if self.training or any(ly.norm_first or ly.activation is not torch.nn.functional.relu for ly in layers):
            return self.forward(actions[None].expand(c, -1), item_vecs[None].expand(c, -1, -1), cand_vec,
                                torch.zeros((c, s), device=cand_vec.device))
        valid = actions > 0
        if not bool(valid.any()):  # no action: every output position is zeroed, the pool is 0 (see forward)
            return cand_vec.new_zeros((c, self.out_dim))
        first = min(int(valid.nonzero()[0]), s - k)  # leading padding changes nothing (see forward)
        actions, item_vecs, valid, s = actions[first:], item_vecs[first:], valid[first:], s - first
        d, nh = self.d_model, self.cfg.n_heads
        dh = d // nh
        u = torch.cat([self.action(actions * valid), item_vecs], dim=-1)  # (S, du): the sequence's token part
        du = u.shape[1]
        mha = layers[0].self_attn
        w_in, w_out = mha.in_proj_weight, mha.out_proj.weight  # (3d, d), (d, d)
        p = torch.nn.functional.linear(u, w_in[:, :du], mha.in_proj_bias)  # (S, 3d)
        pad = ~valid
        shared = []  # per head: its query and key columns, exp(A) (S, S), the values weighted by exp(A)
        for h in range(nh):
            q, key = slice(h * dh, (h + 1) * dh), slice(d + h * dh, d + (h + 1) * dh)
            a = (p[:, q] @ p[:, key].T).mul_(dh ** -0.5).masked_fill_(pad[None, :], float("-inf"))  # (S, S)
            ea = (a - a.amax(dim=1, keepdim=True)).exp_()
            vp = p[:, 2 * d + h * dh: 2 * d + (h + 1) * dh] @ w_out[:, h * dh:(h + 1) * dh].T  # (S, d)
            m = (ea.T[:, :, None] * vp[:, None, :]).reshape(s, s * d)  # (t, s * d): ea[s, t] * vp[t]
            shared.append((q, key, ea, m))
        out = []
        # Candidates in blocks: the (block, S, d) activations stay in cache (memory traffic, not arithmetic, is
        # what a whole-request batch of 200 x 100 tokens waits on).
        block = max(1, self.TOKEN_BLOCK // s)
        for lo in range(0, c, block):
            cv = cand_vec[lo:lo + block]
            cb = cv.shape[0]
            r = cv @ w_in[:, du:].T  # (Cb, 3d)
            attn = (r[:, 2 * d:] @ w_out.T + mha.out_proj.bias)[:, None, :]  # (Cb, 1, d): the values' candidate part
            for q, key, ea, m in shared:
                b = (r[:, q] @ p[:, key].T).mul_(dh ** -0.5).masked_fill_(pad[None, :], float("-inf"))  # (Cb, S)
                eb = (b - b.amax(dim=1, keepdim=True)).exp_()
                z = eb @ ea.T  # (Cb, S) softmax denominators
                if float(z.min()) < 1e-30:  # the split exponentials underflowed: compute it the plain way
                    return self._forward_plain(actions, item_vecs, cand_vec, valid)
                attn = (eb @ m).reshape(cb, s, d).div_(z[:, :, None]).add_(attn)  # (Cb, S, d)
            attn[..., :du] += u  # the residual: the tokens [u_s, c], added in place (no (Cb, S, d) tokens tensor)
            attn[..., du:] += cv[:, None, :]
            x = self._feed_forward(layers[0], layers[0].norm1(attn))
            for layer in layers[1:]:
                x = self._layer(layer, x, pad)
            out.append(self._pool(x, valid))
        return torch.cat(out)

    def _forward_plain(self, actions, item_vecs, cand_vec, valid) -> torch.Tensor:
        c = cand_vec.shape[0]
        tokens = torch.cat([self.action(actions * valid)[None].expand(c, -1, -1), item_vecs[None].expand(c, -1, -1),
                            cand_vec[:, None, :].expand(-1, len(actions), -1)], dim=-1)
        x = tokens
        for layer in self.encoder.layers:
            x = self._layer(layer, x, ~valid)
        return self._pool(x, valid)

    @staticmethod
    def _feed_forward(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.norm2(layer.linear2(torch.relu_(layer.linear1(x))).add_(x))

    def _layer(self, layer: nn.TransformerEncoderLayer, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """One post-norm encoder layer in eval mode, x (C, S, d), pad (S,) the keys nobody attends to."""
        c, s, d = x.shape
        nh = self.cfg.n_heads
        mha = layer.self_attn
        qkv = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # (C, S, 3d)
        q, key, v = (t.reshape(c, s, nh, d // nh).transpose(1, 2) for t in qkv.split(d, dim=-1))  # (C, h, S, dh)
        mask = torch.zeros(s, dtype=x.dtype).masked_fill_(pad, float("-inf"))
        out = torch.nn.functional.scaled_dot_product_attention(q, key, v, attn_mask=mask[None, :])  # (C, h, S, dh)
        out = mha.out_proj(out.transpose(1, 2).reshape(c, s, d))
        return self._feed_forward(layer, layer.norm1(out.add_(x)))

    def _pool(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(C, S, d) last-layer outputs -> (C, (1 + K) * d): max over valid positions, then the latest K."""
        c, s, d = x.shape
        k = self.cfg.latest_k
        if bool(valid.all()):  # a full sequence (the common case at serving): nothing to mask
            return torch.cat([x.amax(dim=1), x[:, s - k:, :].reshape(c, k * d)], dim=-1)
        x = x * valid[None, :, None]
        pooled = x.masked_fill(~valid[None, :, None], float("-inf")).amax(dim=1)  # (C, d)
        return torch.cat([pooled, x[:, s - k:, :].reshape(c, k * d)], dim=-1)
