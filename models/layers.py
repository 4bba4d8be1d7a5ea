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
        n = x.numel()
        words = torch.randint(_I64.min, _I64.max, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype).mul_(256.0 / (256 - self.threshold))  # one autograd op, a float mask

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
        q, k, v = self.qkv(self.ln1(x)).view(b, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])  # (b, heads, L, dh)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, L, d)))
        return x + self.drop(self.ff(self.ln2(x)))
