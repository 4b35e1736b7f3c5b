"""Building blocks of the joint transformer: norms, rotary embeddings, timestep embedding, MLP,
adaLN modulation with per-token levels."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMS norm with a learned scale; used on queries and keys (QK-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.scale.float()).to(x.dtype)


# ---------------------------------------------------------------- rotary position embedding


def rope_angles(pos: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of RoPE angles for (possibly fractional) positions pos [..., L] -> 2 x [..., L, dim/2]."""
    omega = theta ** -(torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64) / dim)
    angles = pos.to(torch.float64).unsqueeze(-1) * omega
    return angles.cos().float(), angles.sin().float()


class EmbedND(nn.Module):
    """RoPE over several named axes: each axis rotates its own slice of the head dimension."""

    def __init__(self, axes_dim: tuple[int, ...], theta: float) -> None:
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids [B, L, n_axes] -> (cos, sin), each [B, 1, L, head_dim/2] (broadcast over heads)."""
        parts = [rope_angles(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        cos = torch.cat([c for c, _ in parts], dim=-1)
        sin = torch.cat([s for _, s in parts], dim=-1)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate consecutive channel pairs of x [B, H, L, Dh] by the angles in pe."""
    cos, sin = pe
    x32 = x.float().unflatten(-1, (-1, 2))  # [B, H, L, Dh/2, 2]
    x1, x2 = x32[..., 0], x32[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


# ---------------------------------------------------------------- timestep conditioning


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding of levels t in [0, 1] (scaled by time_factor, as FLUX does) -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (time_factor * t.float()).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (DiT / FLUX)."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """t [...] -> [..., hidden]."""
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def distinct_levels(t: Tensor) -> tuple[Tensor, Tensor]:
    """Split per-token levels t [B, L] into per-sample distinct levels and an index.

    Returns levels [B, K] (sorted; short rows padded with their largest level) and index [B, L]
    with levels[b, index[b, i]] == t[b, i]. K is the largest number of distinct levels in a sample
    (2 for Self-Flow). Costs one host sync for K; callers that know their levels pass them directly.
    """
    ordered, _ = t.sort(dim=1)
    is_new = torch.ones_like(ordered, dtype=torch.long)
    is_new[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).long()
    rank = is_new.cumsum(1) - 1  # [B, L] position of each sorted value among the distinct ones
    k = int(rank[:, -1].max().item()) + 1
    levels = ordered[:, -1:].expand(-1, k).clone()
    levels.scatter_(1, rank, ordered)
    index = (t.unsqueeze(-1) == levels.unsqueeze(1)).long().argmax(-1)
    return levels, index


def gather_levels(per_level: Tensor, index: Tensor | None) -> Tensor:
    """Per-level vectors [B, K, N] -> per-token [B, L, N] (or [B, 1, N] to broadcast when index is None)."""
    if index is None:
        return per_level
    return torch.gather(per_level, 1, index.unsqueeze(-1).expand(-1, -1, per_level.shape[-1]))


class ModulationOut(NamedTuple):  # a tuple, so DeepSpeed ZeRO-3's backward hooks see its tensors
    shift: Tensor  # [B, L or 1, D]
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """adaLN-Zero modulation: SiLU -> Linear(D, n*3*D), zero-initialised, giving n (shift, scale, gate) sets.

    Applied to the conditioning vectors of the *distinct* levels and gathered per token, which is
    exactly a per-token modulation at a fraction of its cost.
    """

    def __init__(self, hidden: int, sets: int) -> None:
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(hidden, 3 * sets * hidden)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, vec: Tensor, index: Tensor | None) -> list[ModulationOut]:
        """vec [B, K, D] conditioning per level, index [B, L] level of each token (None: K == 1)."""
        per_token = gather_levels(self.lin(F.silu(vec)), index)
        chunks = per_token.chunk(3 * self.sets, dim=-1)
        return [ModulationOut(*chunks[3 * i : 3 * i + 3]) for i in range(self.sets)]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale) + shift


class SwiGLU(nn.Module):
    """Gated MLP: W2 (SiLU(W_gate x) * W_up x)."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(hidden, 2 * mlp_hidden)
        self.w_out = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)
