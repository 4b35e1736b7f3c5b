"""Pins the time convention: t = 0 data, t = 1 noise, velocity = noise - data."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from selfflow.models import flow
from selfflow.models.timesteps import TimestepDist

ROOT = Path(__file__).resolve().parents[1]


def test_interpolant_endpoints_and_velocity():
    x0, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(3)), eps)
    t, h = torch.rand(3, dtype=torch.float64) * 0.8 + 0.1, 1e-6
    x0, eps = x0.double(), eps.double()
    numeric = (flow.interpolate(x0, eps, t + h) - flow.interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(numeric, flow.velocity_target(x0, eps))
    torch.testing.assert_close(flow.velocity_target(x0, eps), eps - x0)


def test_per_token_levels():
    x0, eps = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    t = torch.rand(2, 6)
    x_t = flow.interpolate(x0, eps, t)
    for b in range(2):
        for i in range(6):
            expected = (1 - t[b, i]) * x0[b, i] + t[b, i] * eps[b, i]
            torch.testing.assert_close(x_t[b, i], expected)
    with pytest.raises(ValueError, match="does not lead"):
        flow.interpolate(x0, eps, torch.rand(2, 5))


def test_data_and_noise_predictions_invert_the_interpolant():
    x0, eps, t = torch.randn(4, 7, 2), torch.randn(4, 7, 2), torch.rand(4)
    x_t, v = flow.interpolate(x0, eps, t), flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.predict_data(x_t, v, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.predict_noise(x_t, v, t), eps, atol=1e-5, rtol=1e-5)


def test_velocity_from_a_data_prediction():
    x0, eps, t = torch.randn(4, 7, 2), torch.randn(4, 7, 2), torch.tensor([0.9, 0.5, 0.1, 0.01])
    x_t = flow.interpolate(x0, eps, t)
    v = flow.velocity_from_data(x_t, x0, t)
    # exact above t_min: the true x0 gives the true velocity, and predict_data inverts it
    torch.testing.assert_close(v[:3], flow.velocity_target(x0, eps)[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.predict_data(x_t, v, t)[:3], x0[:3], atol=1e-5, rtol=1e-5)
    # below t_min the division is by t_min, so the velocity stays bounded
    torch.testing.assert_close(v[3], (x_t[3] - x0[3]) / 0.05)


def test_cleaner_level_is_the_smaller():
    t, s = torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.2, 0.8, 0.5])
    assert torch.equal(flow.cleaner_level(t, s), torch.tensor([0.2, 0.1, 0.5]))


def test_shift():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(flow.shift_time(t, 1.0), t)
    shifted = flow.shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and abs(float(shifted[50]) - 0.75) < 1e-12
    assert bool((shifted[1:] > shifted[:-1]).all()) and bool((shifted >= t).all())  # towards noise
    torch.testing.assert_close(flow.shift_time(shifted, 1 / 3.0), t)
    with pytest.raises(ValueError):
        flow.shift_time(t, 0.0)


def test_shifted_logit_normal_is_logit_normal_with_moved_mean():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    d = TimestepDist("logit_normal", mu=0.2, sigma=0.7, shift=2.95)
    z = torch.randn(1000, generator=gen())
    expected = torch.sigmoid(0.2 + math.log(2.95) + 0.7 * z)
    torch.testing.assert_close(d.sample((1000,), generator=gen()), expected, atol=1e-6, rtol=1e-5)


def _ks(samples: torch.Tensor, dist: TimestepDist) -> float:
    x, _ = samples.double().sort()
    cdf = dist.cdf(x)
    n = x.numel()
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(upper - cdf, cdf - (upper - 1 / n)).max())


@pytest.mark.parametrize(
    "dist",
    [
        TimestepDist("uniform"),
        TimestepDist("uniform", shift=3.0),
        TimestepDist("logit_normal"),
        TimestepDist("logit_normal", mu=-0.5, sigma=1.5, shift=1.78),
    ],
)
def test_timestep_distributions_match_their_cdf(dist):
    samples = dist.sample((20_000,), generator=torch.Generator().manual_seed(0))
    assert samples.dtype == torch.float32 and float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
    assert _ks(samples, dist) < 0.015  # KS critical value at alpha = 0.001 is ~0.0138


def test_ks_check_can_fail():
    uniform = TimestepDist("uniform").sample((20_000,), generator=torch.Generator().manual_seed(0))
    assert _ks(uniform, TimestepDist("logit_normal")) > 0.05


def test_bad_distribution_rejected():
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        TimestepDist("cosine")
    with pytest.raises(ValueError):
        TimestepDist("logit_normal", sigma=0.0)


def test_no_other_module_reimplements_the_interpolant():
    """Only models/flow.py may write (1 - t) * x; everything else calls flow.interpolate."""
    pattern = re.compile(r"\(\s*1(\.0)?\s*-\s*[A-Za-z_][\w\[\]., :]*\)\s*\*")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests") or rel == Path("models/flow.py"):
            continue
        offenders += [
            f"{rel}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
        ]
    assert not offenders, f"interpolant re-implemented at {offenders}"
