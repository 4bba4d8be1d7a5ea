"""DCN v2 (Wang et al., 2021) in plain torch: cross layers ``x_{l+1} = x0 * (W x_l + b) + x_l`` with an MLP beside
them (parallel) or after them (stacked). torchrec's CrossNet needs fbgemm and pins its own torch (DESIGN 10)."""

from __future__ import annotations

import torch
from torch import nn


class CrossLayer(nn.Module):
    """One cross layer; ``rank`` set: ``W = U V^T`` (low-rank, d x r + r x d weights instead of d x d)."""

    def __init__(self, dim: int, rank: int | None = None):
        super().__init__()
        if rank is None:
            self.w = nn.Linear(dim, dim)
        else:
            self.w = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0, x: (B, d) -> (B, d)."""
        return x0 * self.w(x) + x


class DCNv2(nn.Module):
    """x0 (B, in_dim) -> (B, out_dim): cross layers and an MLP, ``parallel`` (concatenated) or ``stacked``."""

    def __init__(self, in_dim: int, cross_layers: int, rank: int | None, mlp_hidden: tuple[int, ...],
                 structure: str, dropout: float):
        super().__init__()
        if structure not in ("parallel", "stacked"):
            raise ValueError(f"DCN v2 structure must be 'parallel' or 'stacked', got {structure!r}")
        self.structure = structure
        self.cross = nn.ModuleList(CrossLayer(in_dim, rank) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        width = in_dim
        for h in mlp_hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.out_dim = in_dim + width if structure == "parallel" else width

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if self.structure == "stacked":
            return self.mlp(x)
        return torch.cat([x, self.mlp(x0)], dim=-1)
