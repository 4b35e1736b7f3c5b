"""Image features from a fixed, randomly initialised CNN: a second feature space for KID / FD.

When REPA aligns to the FID Inception network (`objective.repa_encoder=inception`), KID and FID in that
network's space are no longer independent of what REPA was trained towards. Untrained convolutional
networks still give features whose distances track image statistics (edges, blobs, contrast at several
scales), and they are nobody's training target here, so KID in this space is reported next to the
Inception one. The weights are drawn from a CPU generator seeded with `seed`: the same seed gives the
same network, on every machine with the same torch version.

    feats = random_cnn_features(images)  # images [N, C, H, W] in [-1, 1] -> float64 [N, 1152]
    kid(feats_a, feats_b)                 # selfflow.metrics.fid.kid works on any features

Network: images resized to 64 x 64 (grey repeated to RGB), four 3x3 stride-2 convolutions with ReLU
(widths 32, 64, 128, 256; He-normal weights, zero bias), then the global mean of block 3 (128) and a
2 x 2 average pool of block 4 (4 x 256), concatenated: 1152 values per image. Numbers in this space are
comparable only with numbers from the same seed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SEED = 0
INPUT_HW = (64, 64)
WIDTHS = (32, 64, 128, 256)
FEATURE_DIM = WIDTHS[2] + 4 * WIDTHS[3]


@functools.lru_cache(maxsize=4)
def conv_weights(seed: int = SEED) -> tuple[Tensor, ...]:
    """The four conv kernels [C_out, C_in, 3, 3], He-normal from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    weights, c_in = [], 3
    for c_out in WIDTHS:
        std = (2.0 / (c_in * 9)) ** 0.5
        weights.append(torch.randn(c_out, c_in, 3, 3, generator=gen) * std)
        c_in = c_out
    return tuple(weights)


@torch.no_grad()
def random_cnn_features(
    images: Tensor, seed: int = SEED, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Features float64 [N, 1152] of images [N, C, H, W] (C = 1 or 3) in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    weights = [w.to(device) for w in conv_weights(seed)]
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().clamp(-1, 1)  # [B, C, H, W]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # [B, 3, H, W]
        if tuple(x.shape[-2:]) != INPUT_HW:
            x = F.interpolate(x, size=INPUT_HW, mode="bilinear", align_corners=False, antialias=True)
        maps = []
        for w in weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=1))  # [B, C_k, 64 / 2^k, 64 / 2^k]
            maps.append(x)
        pooled = maps[2].mean(dim=(2, 3))  # [B, 128]
        local = F.adaptive_avg_pool2d(maps[3], 2).flatten(1)  # [B, 1024]
        out.append(torch.cat([pooled, local], dim=1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))
