"""Images as 2-D patches: [B, C, H, W] latents <-> tokens [B, (h w), C p p]."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.spec import AXES, ClipSpec


class ImagePatchifier:
    modality = "image"

    def __init__(self, spec: ClipSpec) -> None:
        self.spec = spec
        self.patch = spec.image_patch
        self.grid = spec.image_grid

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, L, C p p]."""
        return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch, q=self.patch)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, L, C p p] -> [B, C, H, W]."""
        h, w = self.grid
        return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=h, w=w, p=self.patch, q=self.patch)

    def position_ids(self) -> Tensor:
        """[L, 4] positions (t, h, w, l): a still image sits at time 0."""
        h, w = self.grid
        ids = torch.zeros(h, w, len(AXES))
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return ids.reshape(h * w, len(AXES))
