"""The one place for the time convention of rectified flow (Self-Flow §3.1, Eq. 1-2).

    t = 0 is data, t = 1 is noise.
    x_t = (1 - t) * x0 + t * eps,   eps ~ N(0, I)
    velocity v = dx_t/dt = eps - x0

Everything else (objectives, samplers, metrics) imports from here; nothing re-implements the
interpolant. Consequences of the convention that other modules rely on:

* the cleaner of two levels is the *smaller* one, so the Self-Flow teacher sees min(t, s);
* a sampler integrates from t = 1 to t = 0, i.e. x_{t - dt} = x_t - dt * v;
* a shift alpha > 1 moves mass towards noise (SD3 / FLUX convention).
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_time(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast levels t ([B] per sample, or [B, L] per token) against x [B, L, ...] or [B, ...]."""
    if t.dim() > x.dim() or t.shape != x.shape[: t.dim()]:
        raise ValueError(f"time of shape {tuple(t.shape)} does not lead the data shape {tuple(x.shape)}")
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim()))).to(x.dtype)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps. t is per sample [B] or per token [B, L] (Self-Flow Eq. 5)."""
    t = expand_time(t, x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Regression target of the velocity head: eps - x0, the same for every level."""
    return noise - x0


def predict_data(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """x0 estimate from a velocity prediction: x0 = x_t - t v."""
    return x_t - expand_time(t, x_t) * velocity


def velocity_from_data(x_t: Tensor, x0: Tensor, t: Tensor, t_min: float = 0.05) -> Tensor:
    """Velocity implied by a data prediction: v = (x_t - x0) / t, with t clamped to t_min.

    x-prediction (JiT, Li & He 2025, Eq. 6): a network that outputs x0 and is trained with the velocity
    loss, ||v_hat - v||^2 = ||x0_hat - x0||^2 / t^2. Unlike v-prediction it still learns when a token
    holds more values than the hidden size, because x0 is low-dimensional and the noise is not.
    """
    return (x_t - x0) / expand_time(t, x_t).clamp_min(t_min)


def predict_noise(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """eps estimate from a velocity prediction: eps = x_t + (1 - t) v."""
    return x_t + (1.0 - expand_time(t, x_t)) * velocity


def cleaner_level(t: Tensor, s: Tensor) -> Tensor:
    """The less noisy of two levels. With t = 1 as noise this is min(t, s) (Self-Flow §3.4)."""
    return torch.minimum(t, s)


def shift_time(t: Tensor, alpha: float) -> Tensor:
    """Timestep shift s(alpha, t) = alpha t / (1 + (alpha - 1) t) (SD3 Eq. 23; Self-Flow App. A).

    Keeps 0 and 1 fixed; alpha > 1 moves levels towards noise. A logit-normal(mu, sigma) shifted by
    alpha is logit-normal(mu + log alpha, sigma).
    """
    if alpha <= 0:
        raise ValueError(f"shift alpha must be > 0, got {alpha}")
    return alpha * t / (1.0 + (alpha - 1.0) * t)
