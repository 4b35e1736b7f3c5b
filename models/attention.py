"""Attention kernels behind one switch.

`sdpa` (torch.nn.functional.scaled_dot_product_attention) is the default and the reference: on
CUDA it already dispatches to FlashAttention-2 / cuDNN / memory-efficient kernels. `flash` and
`xformers` call those libraries directly on CUDA when they are importable; `auto` picks the best
available per call. Calls the external kernels cannot serve (CPU tensors, fp32, a padding mask)
fall back to SDPA, so every backend gives the same numbers up to kernel rounding.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

BACKENDS = ("auto", "sdpa", "flash", "xformers")


def backend_available(name: str) -> bool:
    """Whether the library behind `name` can be imported (SDPA always can)."""
    if name in ("auto", "sdpa"):
        return True
    module = {"flash": "flash_attn", "xformers": "xformers"}[name]
    return importlib.util.find_spec(module) is not None


def check_backend(name: str) -> str:
    """Validate a configured backend name; raises a one-line error when it cannot work here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if not backend_available(name):
        pip = "flash-attn" if name == "flash" else "xformers"
        raise ValueError(f"attention backend {name!r} needs `pip install {pip}` (CUDA only); use 'sdpa'")
    return name


def _external_ok(q: Tensor, mask: Tensor | None) -> bool:
    return q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16)


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func

    q, k, v = (rearrange(x, "b h l d -> b l h d") for x in (q, k, v))
    return rearrange(flash_attn_func(q, k, v), "b l h d -> b h l d")


def _xformers(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    import xformers.ops as xops

    q, k, v = (rearrange(x, "b h l d -> b l h d") for x in (q, k, v))
    return rearrange(xops.memory_efficient_attention(q, k, v), "b l h d -> b h l d")


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, backend: str = "sdpa") -> Tensor:
    """Bidirectional attention.

    q, k, v: [B, H, L, Dh]; mask: bool [B, 1, 1, L] (True = attend) or None. Returns [B, L, H*Dh].
    """
    if backend == "auto":
        if _external_ok(q, mask) and backend_available("flash"):
            backend = "flash"
        elif _external_ok(q, mask) and backend_available("xformers"):
            backend = "xformers"
    if backend == "flash" and _external_ok(q, mask):
        out = _flash(q, k, v)
    elif backend == "xformers" and _external_ok(q, mask):
        out = _xformers(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(out, "b h l d -> b l (h d)")
