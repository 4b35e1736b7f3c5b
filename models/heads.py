"""Projector heads that map a student's hidden states onto an alignment target. They live outside
the transformer so the model stays objective-agnostic; the objectives own them."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectorHead(nn.Module):
    """Self-Flow / SRA projector: Linear(D, 2D) -> SiLU -> Linear(2D, D) (the official `SimpleHead`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]."""
        return self.net(x)


class REPAProjector(nn.Module):
    """REPA projector: a 3-layer SiLU MLP from the model width to the encoder's feature width."""

    def __init__(self, dim: int, feature_dim: int, hidden: int = 2048) -> None:
        super().__init__()
        layers = [nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, feature_dim))

    def forward(self, x: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, F]."""
        return self.net(x)
