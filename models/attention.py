"""Attention without a padding mask: dense over full rows, variable-length (ragged) over the rest.

Captions differ in length, so a batch's text stream is padded. A boolean padding mask would keep that
out of the attention, but a masked call cannot use the fast kernels (FlashAttention, cuDNN). Instead,
the padded tokens are left out of the attention altogether: `Ragged` lists the tokens that attend and
which sequence each belongs to, and `attention` runs over those variable-length sequences only:

- no padding anywhere in the batch (`ragged=None`): dense `scaled_dot_product_attention` without a
  mask, which on CUDA dispatches to FlashAttention-2 / cuDNN / memory-efficient kernels;
- otherwise the kept tokens are gathered into one [T, H, Dh] sequence and attended per sequence:
  `flash_attn_varlen_func` when the `flash` backend is installed (CUDA, bf16 / fp16), else SDPA over a
  jagged nested tensor (flash-class kernels on CUDA); on the CPU one SDPA call per sequence (the
  jagged CPU kernel is the slow math one). The outputs at the left-out positions are 0.

The same mechanism serves packed batches (several samples in one row, attention kept within each):
a sequence is any run of kept tokens, not necessarily a whole row. Why not the alternatives: a masked
call (the previous design) never reaches the fast kernels; FLUX-style attended padding does, but
changes what the model computes (pad tokens become context) and still spends attention on padding;
flex_attention with a block mask needs torch.compile to be fast and is a prototype API on CPU.
Outputs at kept positions equal masked attention (tested on CPU, `tests/test_attention.py`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

BACKENDS = ("auto", "sdpa", "flash")


@dataclass(frozen=True)
class Ragged:
    """The tokens of a [B, N] layout that attend, as variable-length sequences."""

    index: Tensor  # [T] long: positions of the kept tokens in the flattened B * N layout, in order
    offsets: Tensor  # [S + 1] long: where each sequence starts among the T kept tokens (cu_seqlens)
    max_len: int  # the longest sequence
    size: int  # B * N
    bounds: tuple[int, ...] = ()  # `offsets` on the host (the CPU path slices by them)
    min_len: int = 0  # the shortest sequence (0: unknown); with max_len, spares the kernels a sync

    @property
    def cu_seqlens(self) -> Tensor:
        """`offsets` as int32, what flash-attn's varlen kernel takes."""
        return self.offsets.to(torch.int32)


def ragged_segments(segment: Tensor) -> Ragged | None:
    """segment [B, N] long: the sequence each token belongs to within its row (-1: it attends to
    nothing). The tokens of one (row, segment) form one sequence, in position order, wherever they sit
    in the row. None when every row is one sequence without -1, so that the dense, mask-free path
    runs. A few host syncs (the layout's sizes), once per model forward: the blocks reuse it."""
    b, n = segment.shape
    keep = segment >= 0
    if bool((keep & (segment == segment[:, :1])).all()):  # every row one sequence, nothing left out
        return None
    per_row = int(segment.max()) + 1
    key = (torch.arange(b, device=segment.device)[:, None] * per_row + segment).reshape(-1)  # [B * N]
    position = keep.reshape(-1).nonzero().squeeze(1)
    key = key[position]
    index = position[torch.sort(key, stable=True).indices]
    counts = torch.bincount(key, minlength=b * per_row)
    counts = counts[counts > 0]
    offsets = F.pad(counts.cumsum(0), (1, 0))
    bounds = tuple(offsets.tolist())
    lengths = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return Ragged(index, offsets, max(lengths), b * n, bounds, min(lengths))


def ragged_rows(keep: Tensor) -> Ragged | None:
    """One sequence per row of keep [B, N] bool (True = a token that attends)."""
    return ragged_segments(torch.where(keep, 0, -1))


def backend_available(name: str) -> bool:
    """Whether the library behind `name` can be imported (SDPA always can)."""
    return name in ("auto", "sdpa") or importlib.util.find_spec("flash_attn") is not None


def check_backend(name: str) -> str:
    """Validate a configured backend name; raises a one-line error when it cannot work here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if not backend_available(name):
        raise ValueError(f"attention backend {name!r} needs `pip install flash-attn` (CUDA only); use 'sdpa'")
    return name


def _use_flash(q: Tensor, backend: str) -> bool:
    wanted = backend == "flash" or (backend == "auto" and backend_available("flash"))
    return wanted and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _ragged_sdpa(q: Tensor, k: Tensor, v: Tensor, ragged: Ragged) -> Tensor:
    """q, k, v [T, H, Dh] -> [T, H, Dh], attention within each sequence (jagged nested tensors)."""
    nested = [
        torch.nested.nested_tensor_from_jagged(
            x, ragged.offsets, min_seqlen=ragged.min_len or None, max_seqlen=ragged.max_len
        ).transpose(1, 2)
        for x in (q, k, v)
    ]  # [S, H, j, Dh]
    return F.scaled_dot_product_attention(*nested).transpose(1, 2).values()


def _ragged_loop(q: Tensor, k: Tensor, v: Tensor, ragged: Ragged) -> Tensor:
    """The same on the CPU: one mask-free SDPA call per sequence (the jagged kernel there is the slow
    math one: about 6x a masked call for a `small` batch; this loop about 1.5x, README Benchmarks)."""
    pairs = zip(ragged.bounds[:-1], ragged.bounds[1:], strict=True)
    parts = [
        F.scaled_dot_product_attention(*(x[None, a:b].transpose(1, 2) for x in (q, k, v))) for a, b in pairs
    ]
    return torch.cat(
        [p[0].transpose(0, 1) for p in parts]
    )  # [T, H, Dh]; 4-D calls reach the CPU flash kernel


def _ragged_flash(q: Tensor, k: Tensor, v: Tensor, ragged: Ragged) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = ragged.cu_seqlens
    return flash_attn_varlen_func(q, k, v, cu, cu, ragged.max_len, ragged.max_len)


def attention(q: Tensor, k: Tensor, v: Tensor, ragged: Ragged | None = None, backend: str = "sdpa") -> Tensor:
    """Bidirectional attention; q, k, v [B, H, N, Dh] -> [B, N, H * Dh]. With `ragged`, only its
    tokens attend, each to the tokens of its own sequence; the other positions' outputs are 0."""
    flash = _use_flash(q, backend)
    if ragged is None:
        if flash:
            from flash_attn import flash_attn_func

            q, k, v = (rearrange(x, "b h n d -> b n h d") for x in (q, k, v))
            return rearrange(flash_attn_func(q, k, v), "b n h d -> b n (h d)")
        return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
    return _ragged_attention(q, k, v, ragged, flash)


@torch.compiler.disable  # variable lengths: under torch.compile this stays eager instead of recompiling
def _ragged_attention(q: Tensor, k: Tensor, v: Tensor, ragged: Ragged, flash: bool) -> Tensor:
    b, h, n, d = q.shape
    flat = [
        rearrange(x, "b h n d -> (b n) h d").index_select(0, ragged.index) for x in (q, k, v)
    ]  # [T, H, Dh]
    kernel = _ragged_flash if flash else _ragged_sdpa if q.is_cuda or not ragged.bounds else _ragged_loop
    out = kernel(*flat, ragged)
    full = out.new_zeros(ragged.size, h, d).index_copy(0, ragged.index, out)
    return rearrange(full, "(b n) h d -> b n (h d)", b=b)
