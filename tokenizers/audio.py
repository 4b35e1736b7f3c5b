"""Audio as 1-D patches of waveform (or latent) frames: [B, C, N] <-> tokens [B, N / p, C p]."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.spec import AXES, ClipSpec


class AudioPatchifier:
    modality = "audio"

    def __init__(self, spec: ClipSpec) -> None:
        self.spec = spec
        self.patch = spec.audio_patch
        self.grid = (spec.audio_grid,)

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, N] -> [B, L, C p]; consecutive samples of one channel stay together."""
        return rearrange(x, "b c (n p) -> b n (c p)", p=self.patch)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, L, C p] -> [B, C, N]."""
        return rearrange(tokens, "b n (c p) -> b c (n p)", p=self.patch)

    def position_ids(self) -> Tensor:
        """[L, 4] positions (t, h, w, l); t is the start time of the token in 10 ms ticks."""
        (n,) = self.grid
        ids = torch.zeros(n, len(AXES), dtype=torch.float64)
        ids[:, 0] = torch.arange(n, dtype=torch.float64) * self.spec.audio_token_ticks
        return ids.float()
