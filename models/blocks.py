"""Transformer blocks of the joint model (FLUX / MMDiT layout).

Double-stream blocks keep separate weights for the text and media streams and attend once over
their concatenation; single-stream blocks share weights over the joint sequence. Modulation is
computed once per forward (shared across blocks, as in FLUX.2) and arrives here per token.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from selfflow.models.attention import Ragged, attention
from selfflow.models.layers import ModulationOut, RMSNorm, SwiGLU, apply_rope, gather_levels, modulate

PE = tuple[Tensor, Tensor]


def _layer_norm(hidden: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.q = RMSNorm(head_dim)
        self.k = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q(q), self.k(k)


class StreamQKV(nn.Module):
    """One stream's pre-attention path: adaLN -> qkv -> QK-norm. Returns q, k, v [B, H, L, Dh]."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _layer_norm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.qk_norm = QKNorm(hidden // heads)

    def forward(self, x: Tensor, mod: ModulationOut) -> tuple[Tensor, Tensor, Tensor]:
        qkv = self.qkv(modulate(self.norm(x), mod.shift, mod.scale))
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.heads)
        q, k = self.qk_norm(q, k)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_hidden: int, qkv_bias: bool, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.img_attn, self.txt_attn = StreamQKV(hidden, heads, qkv_bias), StreamQKV(hidden, heads, qkv_bias)
        self.img_proj, self.txt_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.img_norm2, self.txt_norm2 = _layer_norm(hidden), _layer_norm(hidden)
        self.img_mlp, self.txt_mlp = SwiGLU(hidden, mlp_hidden), SwiGLU(hidden, mlp_hidden)

    def forward(
        self,
        img: Tensor,  # [B, L, D] media stream
        txt: Tensor,  # [B, Lt, D] text stream
        img_mod: list[ModulationOut],  # 2 sets (attention, MLP), each [B, L or 1, D]
        txt_mod: list[ModulationOut],  # 2 sets, each [B, 1, D]
        pe: PE,  # over the joint sequence [txt; img]
        ragged: Ragged | None,  # the tokens of [txt; img] that attend (None: all)
    ) -> tuple[Tensor, Tensor]:
        iq, ik, iv = self.img_attn(img, img_mod[0])
        tq, tk, tv = self.txt_attn(txt, txt_mod[0])
        q, k, v = (torch.cat(pair, dim=2) for pair in ((tq, iq), (tk, ik), (tv, iv)))
        out = attention(apply_rope(q, pe), apply_rope(k, pe), v, ragged, self.backend)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]

        img = img + img_mod[0].gate * self.img_proj(img_out)
        img = img + img_mod[1].gate * self.img_mlp(
            modulate(self.img_norm2(img), img_mod[1].shift, img_mod[1].scale)
        )
        txt = txt + txt_mod[0].gate * self.txt_proj(txt_out)
        txt = txt + txt_mod[1].gate * self.txt_mlp(
            modulate(self.txt_norm2(txt), txt_mod[1].shift, txt_mod[1].scale)
        )
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU over the joint sequence with fused input/output projections."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int, qkv_bias: bool, backend: str) -> None:
        super().__init__()
        self.heads, self.hidden, self.mlp_hidden, self.backend = heads, hidden, mlp_hidden, backend
        self.norm = _layer_norm(hidden)
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * mlp_hidden, bias=qkv_bias)
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden)
        self.qk_norm = QKNorm(hidden // heads)

    def forward(self, x: Tensor, mod: ModulationOut, pe: PE, ragged: Ragged | None) -> Tensor:
        """x [B, Lt + L, D]; mod per token [B, Lt + L, D]."""
        h = self.linear1(modulate(self.norm(x), mod.shift, mod.scale))
        qkv, mlp = h.split([3 * self.hidden, 2 * self.mlp_hidden], dim=-1)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.heads)
        q, k = self.qk_norm(q, k)
        attn = attention(apply_rope(q, pe), apply_rope(k, pe), v, ragged, self.backend)
        gate, up = mlp.chunk(2, dim=-1)
        return x + mod.gate * self.linear2(torch.cat([attn, nn.functional.silu(gate) * up], dim=-1))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) per token, then one zero-initialised output projection per modality."""

    def __init__(self, hidden: int, out_channels: dict[str, int]) -> None:
        super().__init__()
        self.norm = _layer_norm(hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.ModuleDict({m: nn.Linear(hidden, c) for m, c in out_channels.items()})
        for lin in (self.ada[1], *self.out.values()):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self, x: Tensor, vec: Tensor, index: Tensor | None, lengths: dict[str, int]
    ) -> dict[str, Tensor]:
        """x [B, L, D] media tokens, vec [B, K, D] per-level conditioning -> {modality: [B, L_m, C_m]}."""
        shift, scale = gather_levels(self.ada(vec), index).chunk(2, dim=-1)
        x = modulate(self.norm(x), shift, scale)
        parts = x.split(list(lengths.values()), dim=1)
        return {m: self.out[m](p) for m, p in zip(lengths, parts, strict=True)}
