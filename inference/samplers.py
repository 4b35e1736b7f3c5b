"""Samplers for rectified flow: free functions over a velocity callable, no model imports.

The time convention is owned by `selfflow.models.flow` (t = 0 data, t = 1 noise, v = eps - x0);
every sampler integrates from t = 1 down to t = 0 and takes `x1` [B, ...] ~ N(0, I).

Sources: Euler / Heun ODE steps (Karras et al. 2022, "Elucidating the Design Space", Alg. 1);
Euler-Maruyama SDE sampler with "sigma" diffusion and a noise-free last step (Ma et al. 2024, SiT,
`transport/integrators.py`); timestep shift (Esser et al. 2024, SD3 Eq. 23); classifier-free guidance
(Ho & Salimans 2022) restricted to a guidance interval (Kynkaanniemi et al. 2024; REPA, Yu et al. 2024,
whose t = 1 is noise as here).

The samplers run under `torch.no_grad()`. Noise is drawn on the CPU from one `torch.Generator` per
sample and then moved to the device, so a sample depends only on its seed: not on the batch it is in,
nor on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from selfflow.models import flow

Velocity = Callable[[Tensor, Tensor], Tensor]
"""v = fn(x, t): x [B, ...], t [B] (one level per sample, t = 1 noise) -> v [B, ...] ~ eps - x0."""

NoiseSource = Sequence[int] | Sequence[torch.Generator] | None
"""Per-sample seeds or CPU generators (one per sample), or None for the global RNG (batch-dependent)."""

_SDE_SEED_OFFSET = 0x5DEECE66D_0000  # seeds the SDE's step noise apart from the initial noise of the seed


def get_schedule(steps: int, shift: float = 1.0) -> Tensor:
    """steps + 1 float64 CPU levels from 1.0 (noise) down to 0.0 (data), shifted by `flow.shift_time`.

    Uniform in t before the shift; shift > 1 moves interior levels towards noise (SD3 Eq. 23). The
    endpoints are set to exactly 1 and 0 (the shift keeps them up to rounding).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    levels = flow.shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)  # [steps+1]
    levels[0], levels[-1] = 1.0, 0.0
    return levels


def _generators(noise: Sequence[int] | Sequence[torch.Generator], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample: ints are seeds (plus `offset`), generators are used as given."""
    gens = []
    for item in noise:
        if isinstance(item, torch.Generator):
            gens.append(item)
        else:
            gens.append(torch.Generator().manual_seed((int(item) + offset) % 2**64))
    return gens


def _randn_per_sample(
    shape: tuple[int, ...], gens: Sequence[torch.Generator], dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """Stack float32 CPU draws, one per generator, then cast and move: [len(gens), *shape]."""
    draws = [torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]
    return torch.stack(draws).to(device=device, dtype=dtype)


def initial_noise(
    shape_per_sample: tuple[int, ...],
    seeds: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """x1 [B, *shape_per_sample], B = len(seeds); sample i is randn from Generator().manual_seed(seeds[i]).

    Drawn in float32 on the CPU, so the same seed gives the same noise for any batch, dtype and device.
    """
    return _randn_per_sample(tuple(shape_per_sample), _generators(seeds), dtype, device)


def _levels(schedule: Tensor) -> list[float]:
    """Validate a 1-D schedule of >= 2 strictly decreasing levels in [0, 1]; return python floats."""
    if schedule.dim() != 1 or schedule.numel() < 2:
        raise ValueError(f"schedule must be 1-D with >= 2 levels, got shape {tuple(schedule.shape)}")
    levels = [float(t) for t in schedule.double()]
    if any(b >= a for a, b in zip(levels, levels[1:], strict=False)) or levels[0] > 1 or levels[-1] < 0:
        raise ValueError("schedule must decrease strictly within [0, 1]")
    return levels


def _time(t: float, x: Tensor) -> Tensor:
    """Level t for every sample: [B], at least float32 (float64 when x is)."""
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


@torch.no_grad()
def euler(v_fn: Velocity, x1: Tensor, schedule: Tensor) -> Tensor:
    """Euler ODE: x_{t_next} = x_t + (t_next - t) v(x_t, t). x1 [B, ...] -> x at schedule[-1]."""
    levels, x = _levels(schedule), x1
    for t, t_next in zip(levels[:-1], levels[1:], strict=True):
        x = x + (t_next - t) * v_fn(x, _time(t, x))
    return x


@torch.no_grad()
def heun(v_fn: Velocity, x1: Tensor, schedule: Tensor) -> Tensor:
    """Heun (explicit trapezoid, Karras et al. 2022 Alg. 1): 2nd order, two velocity calls per step.

    A step into t = 0 is a plain Euler step (Karras' Alg. 1 does the same for sigma = 0): it is the
    x0 prediction `flow.predict_data`, saves a call, and keeps the global error O(h^2).
    """
    levels, x = _levels(schedule), x1
    for t, t_next in zip(levels[:-1], levels[1:], strict=True):
        dt = t_next - t
        d = v_fn(x, _time(t, x))  # [B, ...]
        x_euler = x + dt * d
        if t_next == 0.0:
            x = x_euler
        else:
            x = x + dt * 0.5 * (d + v_fn(x_euler, _time(t_next, x)))
    return x


@torch.no_grad()
def euler_maruyama(
    v_fn: Velocity, x1: Tensor, schedule: Tensor, noise: NoiseSource = None, diffusion_norm: float = 1.0
) -> Tensor:
    """Reverse-time SDE with the marginals of the flow (SiT's "sigma" diffusion), in our convention.

    For any D(t) >= 0, dx = [v + D s] dt + sqrt(2 D) dW (t increasing) has the flow's marginals p_t,
    with score s = grad log p_t = -eps_hat / t, eps_hat = `flow.predict_noise(x, v, t)`. Run backward,
    a step of size h = t - t_next > 0 is
        x_{t_next} = x_t - h v + h D s + sqrt(2 D h) z,   z ~ N(0, I).
    SiT's "sigma" form is D = norm * sigma_t; here sigma_t = t, so D s = -norm * eps_hat: no 1/t
    singularity near data, and at t = 1 eps_hat = x. The last step is deterministic, as in SiT: it
    is an Euler (probability-flow) step, i.e. the x0 prediction when it ends at 0. (SiT's "Mean" step
    keeps the -h norm eps_hat drift; without its noise that term only shrinks the samples.)
    diffusion_norm = 0 is exactly `euler`. `noise`: per-sample seeds (offset from the initial-noise
    seeds, so the two streams differ) or generators, one per sample; None uses the global RNG.
    """
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    levels, x = _levels(schedule), x1
    gens = None if noise is None else _generators(noise, _SDE_SEED_OFFSET)
    if gens is not None and len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} noise sources for a batch of {x.shape[0]}")
    last = len(levels) - 2
    for i, (t, t_next) in enumerate(zip(levels[:-1], levels[1:], strict=True)):
        h = t - t_next
        t_b = _time(t, x)  # [B]
        v = v_fn(x, t_b)  # [B, ...]
        x_mean = x - h * v
        if i == last or diffusion_norm == 0.0:
            x = x_mean
            continue
        x_mean = x_mean - (h * diffusion_norm) * flow.predict_noise(x, v, t_b)  # + h D s
        if gens is None:
            z = torch.randn_like(x)
        else:
            z = _randn_per_sample(tuple(x.shape[1:]), gens, x.dtype, x.device)
        x = x_mean + (2.0 * diffusion_norm * t * h) ** 0.5 * z
    return x


def cfg(
    v_fn_cond: Velocity, v_fn_uncond: Velocity, scale: float, interval: tuple[float, float] = (0.0, 1.0)
) -> Velocity:
    """Classifier-free guidance v = v_u + scale (v_c - v_u) (Ho & Salimans 2022) as a `Velocity`.

    Guidance applies only to samples whose level t lies in the closed `interval` [lo, hi] (in our t,
    1 = noise; REPA uses the same convention, e.g. (0.0, 0.7)); other samples get v_c exactly. The
    unconditional field is evaluated on the whole batch (so closures holding batch-sized conditioning
    stay valid), and not at all when scale == 1 or no sample is inside the interval.
    """
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {interval}")

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v_c = v_fn_cond(x, t)  # [B, ...]
        inside = (t >= lo) & (t <= hi)  # [B]
        if scale == 1.0 or not bool(inside.any()):
            return v_c
        v_u = v_fn_uncond(x, t)
        mask = inside.reshape(-1, *([1] * (v_c.dim() - 1)))  # [B, 1, ...]
        return torch.where(mask, v_u + scale * (v_c - v_u), v_c)

    return guided


class SamplingStopped(Exception):
    """A `stoppable` velocity was asked to stop: the sample being drawn is abandoned."""


def stoppable(v_fn: Velocity, should_stop: Callable[[], bool]) -> Velocity:
    """`v_fn` that asks `should_stop()` before every evaluation and raises SamplingStopped when it says
    yes, so that any sampler ends within one evaluation of a request (e.g. a preemption signal while a
    training run draws its sample grid) without knowing about it."""

    def checked(x: Tensor, t: Tensor) -> Tensor:
        if should_stop():
            raise SamplingStopped
        return v_fn(x, t)

    return checked


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "heun": heun, "euler_maruyama": euler_maruyama}


def evaluations(name: str, steps: int) -> int:
    """Velocity calls of sampler `name` over `steps` steps (heun's last step into t = 0 is Euler)."""
    return 2 * steps - 1 if name == "heun" else steps


def sample(name: str, v_fn: Velocity, x1: Tensor, steps: int, shift: float = 1.0, **kw: object) -> Tensor:
    """Run sampler `name` over `get_schedule(steps, shift)`; `kw` go to the sampler (e.g. noise=...)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](v_fn, x1, get_schedule(steps, shift), **kw)
