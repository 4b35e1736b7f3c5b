"""p(t), the training distribution of noise levels, as plain config data (Self-Flow §3.2; SD3 §3.1).

It is a field of the config schema, which loads without torch; torch and the shift of
`selfflow.models.flow` (the time convention's owner) are imported when levels are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

TIMESTEP_KINDS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimestepDist:
    """Training distribution p(t) of noise levels.

    kind: "uniform" (U(0, 1)) or "logit_normal" (sigmoid of N(mu, sigma)); shift: alpha applied
    after sampling (1.0 = none).
    """

    kind: str = "uniform"
    mu: float = 0.0
    sigma: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TIMESTEP_KINDS:
            raise ValueError(f"unknown timestep distribution {self.kind!r}; expected one of {TIMESTEP_KINDS}")
        if self.sigma <= 0 or self.shift <= 0:
            raise ValueError(f"sigma and shift must be > 0, got sigma={self.sigma} shift={self.shift}")

    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Draw float32 levels in [0, 1] of the given shape."""
        import torch

        from selfflow.models.flow import shift_time

        if self.kind == "uniform":
            t = torch.rand(shape, generator=generator, device=device)
        else:
            z = torch.randn(shape, generator=generator, device=device)
            t = torch.sigmoid(self.mu + self.sigma * z)
        return t if self.shift == 1.0 else shift_time(t, self.shift)

    def cdf(self, t: Tensor) -> Tensor:
        """P(T <= t), used by tests to pin the distribution."""
        import torch

        from selfflow.models.flow import shift_time

        u = t if self.shift == 1.0 else shift_time(t, 1.0 / self.shift)  # the shift's inverse is 1/alpha
        if self.kind == "uniform":
            return u.clamp(0.0, 1.0)
        logit = torch.log(u) - torch.log1p(-u)
        return 0.5 * (1.0 + torch.erf((logit - self.mu) / (self.sigma * math.sqrt(2.0))))
