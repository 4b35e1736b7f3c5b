"""Video as 3-D patches over (t, h, w): [B, C, T, H, W] latents <-> tokens [B, (t h w), C pt ph pw]."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.spec import AXES, TICKS_PER_SECOND, ClipSpec


class VideoPatchifier:
    modality = "video"

    def __init__(self, spec: ClipSpec) -> None:
        self.spec = spec
        self.patch = spec.video_patch
        self.grid = spec.video_grid

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, L, C pt ph pw]."""
        pt, ph, pw = self.patch
        return rearrange(x, "b c (t k) (h p) (w q) -> b (t h w) (c k p q)", k=pt, p=ph, q=pw)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, L, C pt ph pw] -> [B, C, T, H, W]."""
        (pt, ph, pw), (t, h, w) = self.patch, self.grid
        return rearrange(
            tokens, "b (t h w) (c k p q) -> b c (t k) (h p) (w q)", t=t, h=h, w=w, k=pt, p=ph, q=pw
        )

    def position_ids(self) -> Tensor:
        """[L, 4] positions (t, h, w, l); t is the start time of the token's first frame in 10 ms ticks."""
        t, h, w = self.grid
        ids = torch.zeros(t, h, w, len(AXES), dtype=torch.float64)
        if self.spec.causal_time:  # latent frames cover 1, then time_stride frames: place them by frame
            frames = [self.spec.latent_frame_start(i * self.patch[0]) for i in range(t)]
            ticks = torch.tensor(frames, dtype=torch.float64) / self.spec.fps * TICKS_PER_SECOND
        else:
            ticks = torch.arange(t, dtype=torch.float64) * self.spec.video_token_ticks
        ids[..., 0] = ticks[:, None, None]
        ids[..., 1] = torch.arange(h)[None, :, None]
        ids[..., 2] = torch.arange(w)[None, None, :]
        return ids.reshape(t * h * w, len(AXES)).float()
