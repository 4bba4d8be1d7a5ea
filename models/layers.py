"""Small building blocks shared by the towers, written for CPU training speed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_I64 = torch.iinfo(torch.int64)


class FastDropout(nn.Module):
    """Inverted dropout whose mask comes from random bytes; ``p`` is rounded to a multiple of 1/256.

    Why: torch's CPU dropout draws one float per element, which on a 2-core machine costs more than the
    encoder's matmuls (about 60 ms for a 512 x 32 x 64 activation); one random int64 yields eight byte masks.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 256)  # a byte below this drops the element

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return x * self._keep(x).mul_(self._scale)  # one autograd op, a float mask

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + dropout(y) as one op (addcmul, the scale as its value): a block's residual add and its dropout."""
        if not self.training or self.threshold == 0:
            return x + y
        return torch.addcmul(x, y, self._keep(y), value=self._scale)

    @property
    def _scale(self) -> float:
        return 256.0 / (256 - self.threshold)

    def _keep(self, like: torch.Tensor) -> torch.Tensor:
        """1.0 for a kept element, 0.0 for a dropped one, in the shape and dtype of ``like``.

        The comparison writes floats directly (``out=``): a bool comparison then a cast costs 8x as much here, and
        ``torch.where(keep, scale, 0)`` 3x that.
        """
        n = like.numel()
        words = torch.randint(_I64.min, _I64.max, ((n + 7) // 8,), dtype=torch.int64, device=like.device)
        keep = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return torch.ge(words.view(torch.uint8)[:n].view(like.shape), self.threshold, out=keep)

    def extra_repr(self) -> str:
        return f"p={self.threshold / 256:g}"


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> dropout -> Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), FastDropout(dropout), nn.Linear(hidden, out_dim)
    )


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block: x + attn(ln(x)), then x + ff(ln(x)).

    Dropout sits on the two residual branches; attention weights are not dropped (a (b, heads, L, L) mask per
    step is the costliest dropout on CPU and helps little on short histories).

    q, k and v come from three thirds of one ``qkv`` weight (see forward); both residual adds take their
    dropout in the same op (``FastDropout.residual``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.drop = FastDropout(dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """x (b, L, d); attend (b, L) bool, True for keys that may be attended to -> (b, L, d).

        Every row of ``attend`` needs at least one True, or its attention is 0/0.
        """
        b, L, d = x.shape
        h, dh = self.n_heads, d // self.n_heads
        y = self.ln1(x)
        # q, k, v each from its third of qkv's weight, viewed (b, heads, L, dh) over a contiguous (b, L, d): the
        # attention kernel's gradients then come back in that layout and need no copy into a (b, L, 3d) tensor
        q, k, v = (F.linear(y, w, bias).view(b, L, h, dh).transpose(1, 2)
                   for w, bias in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3), strict=True))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])  # (b, heads, L, dh)
        a = a.transpose(1, 2).reshape(b, L, d)
        x = self.drop.residual(x, self.proj(a))
        return self.drop.residual(x, self.ff(self.ln2(x)))


def unique_inverse(idx: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(idx, return_inverse=True)`` for indices into a table of ``n_rows``: idx (n,) long ->
    (sorted unique values (u,), inverse (n,)).

    Without a sort when the table is not much bigger than idx: mark the rows present, number them in order
    (a 512 x 16 batch against a few thousand items: 0.05 ms instead of 0.3). Indices outside [0, n_rows) take
    torch.unique, so that the item tower names the bad index.
    """
    if idx.numel() == 0 or n_rows > 16 * idx.numel():
        return torch.unique(idx, return_inverse=True)
    lo, hi = torch.aminmax(idx)
    if int(lo) < 0 or int(hi) >= n_rows:
        return torch.unique(idx, return_inverse=True)
    present = torch.zeros(n_rows, dtype=torch.bool, device=idx.device)
    present[idx] = True
    uniq = present.nonzero().squeeze(1)
    slot = torch.empty(n_rows, dtype=torch.long, device=idx.device)
    slot[uniq] = torch.arange(uniq.numel(), device=idx.device)
    return uniq, slot[idx]


def mean_bag(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of ``weight``'s rows per row of ids: weight (n_rows, d), ids (b, T) long, 0 = padding -> (b, d).

    What ``nn.EmbeddingBag(mode="mean", padding_idx=0)`` computes (a row of padding only gives 0, row 0 gets no
    gradient), with CPU's fast kernel: a padding_idx keeps the bag off it, and the bag's dense backward sorts
    every index first (2-3x this one, ``_MeanBag``). Relies on row 0 being zero, as padding_idx keeps it; a
    weight whose row 0 is not takes the plain path.
    """
    if ids.dim() != 2:
        raise ValueError(f"bag ids must be (b, T), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        return weight.new_zeros(ids.shape[0], weight.shape[1])
    small = ids.shape[0] <= 64 and not (torch.is_grad_enabled() and weight.requires_grad)
    if small or bool(weight[0].any()):  # serving a few requests: one plain op beats the fast kernel's extra steps
        return F.embedding_bag(ids, weight, mode="mean", padding_idx=0)
    scale = 1.0 / (ids > 0).sum(dim=1, keepdim=True).clamp(min=1).to(weight.dtype)  # (b, 1)
    return _MeanBag.apply(weight, ids, scale)


class _MeanBag(torch.autograd.Function):
    """sum of the rows of each bag x scale; the gradient of weight as one accumulating index_put of the scaled
    bag gradients, one per slot."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids, scale)
        ctx.n_rows = weight.shape[0]
        return F.embedding_bag(ids, weight, mode="sum") * scale  # padding adds row 0, i.e. zeros

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ids, scale = ctx.saved_tensors
        b, t = ids.shape
        bag_of = torch.arange(b, device=ids.device).repeat_interleave(t)  # (b T,) the bag of each slot
        per_slot = (grad * scale).index_select(0, bag_of)  # (b T, d)
        g = grad.new_zeros(ctx.n_rows, grad.shape[1]).index_put_((ids.reshape(-1),), per_slot, accumulate=True)
        g[0] = 0  # padding learns nothing
        return g, None, None


def small_embedding(table: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """``table(idx)`` for a table of a few rows looked up many times (action types, time-gap buckets: (b, L) ids):
    idx (...) long -> (..., d). The backward is one index_add into the table (torch's sorts every id first: 5x the
    time for 8,192 ids into 7 rows); ``padding_idx`` gets no gradient, as in nn.Embedding."""
    return _SmallEmbedding.apply(table.weight, idx, table.padding_idx)


class _SmallEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.n_rows, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (idx,) = ctx.saved_tensors
        d = grad.shape[-1]
        g = grad.new_zeros(ctx.n_rows, d).index_add_(0, idx.reshape(-1), grad.reshape(-1, d))
        if ctx.padding_idx is not None:
            g[ctx.padding_idx] = 0
        return g, None, None
