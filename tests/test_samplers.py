"""Samplers against analytic velocity fields (t = 0 data, t = 1 noise, v = eps - x0)."""

from __future__ import annotations

import pytest
import torch

from selfflow.inference import samplers
from selfflow.models import flow

MU, S = 1.5, 0.5  # 1-D Gaussian data N(MU, S^2)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact E[eps - x0 | x_t] for x0 ~ N(MU, S^2), eps ~ N(0, 1): affine in x.

    x_t has mean a MU and variance a^2 S^2 + t^2 (a = 1 - t); Cov(eps - x0, x_t) = t - a S^2.
    """
    t = flow.expand_time(t, x)
    a = 1.0 - t
    return -MU + (t - a * S**2) / (a**2 * S**2 + t**2) * (x - a * MU)


def gaussian_endpoint(x1: torch.Tensor) -> torch.Tensor:
    """The ODE keeps the standardised coordinate (x_t - a MU) / sqrt(var_t), so x0 = MU + S x1."""
    return MU + S * x1


def test_schedule():
    for steps in (1, 7, 50):
        plain, shifted = samplers.get_schedule(steps), samplers.get_schedule(steps, shift=3.0)
        for s in (plain, shifted):
            assert s.shape == (steps + 1,) and s.dtype == torch.float64
            assert s[0] == 1.0 and s[-1] == 0.0
            assert bool((s[1:] < s[:-1]).all())
        torch.testing.assert_close(plain, torch.linspace(1, 0, steps + 1, dtype=torch.float64))
        assert bool((shifted[1:-1] > plain[1:-1]).all())  # towards noise
    assert samplers.get_schedule(4, shift=0.1)[0] == 1.0
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            samplers.get_schedule(bad)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("steps,shift", [(1, 1.0), (3, 1.0), (10, 3.0), (25, 0.5)])
def test_straight_path_is_exact(name, steps, shift):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, generator=gen), torch.randn(4, 3, 5, generator=gen)
    v_true = flow.velocity_target(x0, eps)

    def v_fn(x, t):
        assert t.shape == (4,)
        return v_true

    out = samplers.sample(name, v_fn, eps, steps, shift=shift)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=1e-6)


def _error(name: str, steps: int, x1: torch.Tensor) -> float:
    out = samplers.sample(name, gaussian_velocity, x1, steps)
    return float((out - gaussian_endpoint(x1)).abs().max())


def test_orders_of_convergence_on_gaussian_flow():
    x1 = torch.linspace(-3, 3, 13, dtype=torch.float64)
    # the closed form agrees with a fine Euler integration
    fine = samplers.euler(gaussian_velocity, x1, samplers.get_schedule(10_000))
    torch.testing.assert_close(fine, gaussian_endpoint(x1), atol=1e-3, rtol=0)
    e_euler = [_error("euler", n, x1) for n in (16, 32, 64)]
    e_heun = [_error("heun", n, x1) for n in (16, 32, 64)]
    for coarse, finer in zip(e_euler, e_euler[1:], strict=False):
        assert 1.6 < coarse / finer < 2.5  # first order
    for coarse, finer in zip(e_heun, e_heun[1:], strict=False):
        assert 3.0 < coarse / finer < 5.0  # second order
    assert e_heun[-1] < 1e-3 and e_euler[-1] < 5e-2


def test_cfg():
    v_c, v_u = torch.full((4, 2, 3), 2.0), torch.full((4, 2, 3), -1.0)
    calls = []

    def cond(x, t):
        return v_c

    def uncond(x, t):
        calls.append(t)
        return v_u

    x, t = torch.zeros(4, 2, 3), torch.tensor([0.1, 0.5, 0.7, 0.95])
    assert torch.equal(samplers.cfg(cond, uncond, 1.0)(x, t), v_c) and not calls
    torch.testing.assert_close(samplers.cfg(cond, uncond, 4.0)(x, t), v_u + 4.0 * (v_c - v_u))
    mixed = samplers.cfg(cond, uncond, 4.0, interval=(0.3, 0.7))(x, t)
    inside = torch.tensor([False, True, True, False])
    assert torch.equal(mixed[~inside], v_c[~inside])
    torch.testing.assert_close(mixed[inside], torch.full((2, 2, 3), 11.0))
    calls.clear()
    assert torch.equal(samplers.cfg(cond, uncond, 4.0, interval=(0.0, 0.05))(x, t), v_c) and not calls
    with pytest.raises(ValueError, match="interval"):
        samplers.cfg(cond, uncond, 2.0, interval=(0.8, 0.2))


@pytest.mark.parametrize("name", ["euler", "euler_maruyama"])
def test_per_sample_seeds_are_batch_independent(name):
    seeds = [11, 5, 11_000]
    kw = {"noise": seeds} if name == "euler_maruyama" else {}

    def run(ss):
        x1 = samplers.initial_noise((2, 3), ss, dtype=torch.float64)
        extra = {"noise": ss} if kw else {}
        return samplers.sample(name, gaussian_velocity, x1, 12, shift=2.0, **extra)

    batch = run(seeds)
    assert batch.shape == (3, 2, 3)
    for i, seed in enumerate(seeds):
        torch.testing.assert_close(run([seed])[0], batch[i], atol=1e-12, rtol=0)
    assert torch.equal(run([5, 5])[0], run([5, 5])[1])
    assert not torch.allclose(batch[0], batch[1])
    noise = samplers.initial_noise((2, 3), [7])
    assert torch.equal(noise[0], torch.randn(2, 3, generator=torch.Generator().manual_seed(7)))


def test_sde_steps_differ_from_initial_noise_stream():
    """Seeding the step noise with the initial-noise seed would replay eps as the first step's z."""
    x1 = samplers.initial_noise((64,), [3], dtype=torch.float64)
    zero = samplers.euler_maruyama(lambda x, t: torch.zeros_like(x), x1, samplers.get_schedule(2), noise=[3])
    # v = 0: eps_hat = x, step 1 (h = 1/2, t = 1) gives x/2 + z; step 2 is deterministic (x unchanged)
    z = zero - 0.5 * x1
    corr = float(torch.corrcoef(torch.stack([z[0], x1[0]]))[0, 1])
    assert abs(float(z.std()) - 1.0) < 0.35 and abs(corr) < 0.4


def test_euler_maruyama_without_diffusion_is_euler():
    x1 = samplers.initial_noise((4,), [0, 1, 2], dtype=torch.float64)
    sched = samplers.get_schedule(9, shift=3.0)
    ode = samplers.euler(gaussian_velocity, x1, sched)
    sde = samplers.euler_maruyama(gaussian_velocity, x1, sched, noise=[0, 1, 2], diffusion_norm=0.0)
    assert torch.equal(sde, ode)


def test_euler_maruyama_matches_gaussian_data():
    torch.manual_seed(0)
    x1 = torch.randn(4000, dtype=torch.float64)
    out = samplers.sample("euler_maruyama", gaussian_velocity, x1, 100, diffusion_norm=1.0)
    assert abs(float(out.mean()) - MU) < 0.04  # standard error 0.008
    assert abs(float(out.var()) / S**2 - 1.0) < 0.12  # standard error 0.022
    assert float((out - gaussian_endpoint(x1)).abs().mean()) > 0.1  # the noise did move the samples


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'; expected one of"):
        samplers.sample("ddim", gaussian_velocity, torch.zeros(1, 2), 4)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_a_stoppable_velocity_ends_any_sampler_within_one_evaluation(name):
    calls = []

    def v_fn(x, t):
        calls.append(float(t[0]))
        return x

    stop_after = 3
    v = samplers.stoppable(v_fn, lambda: len(calls) >= stop_after)
    with pytest.raises(samplers.SamplingStopped):
        samplers.sample(name, v, torch.randn(2, 4), steps=50)
    assert len(calls) == stop_after
    calls.clear()
    samplers.sample(name, samplers.stoppable(v_fn, lambda: False), torch.randn(2, 4), steps=5)
    assert len(calls) == samplers.evaluations(name, 5)  # never asked to stop: an ordinary run
