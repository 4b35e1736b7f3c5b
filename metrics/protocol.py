"""How evaluation samples are drawn: the paper's protocol by default, every setting written to the report.

Self-Flow reports every quantitative comparison without guidance: 50 ODE (Euler) steps, CFG off, and a
sample shift that depends on the autoencoder (1.78 for SD-VAE, 6.93 for FLUX.2's AE and the audio AE,
15.0 for Wan2.2; `../shared/docs/selfflow-method.md` §5, paper App. A.4). Our default `shift` is
therefore the model's own `sample.shift` (the preset states the codec's value), not a constant.
Guidance is for looking at samples; a number reported with CFG says so in its `protocol` field.

No torch here: the command lines read these defaults for `--help`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

EVAL_TASKS = ("class", "text", "video", "av")  # metrics/suite.py


@dataclass(frozen=True)
class Protocol:
    """Sampler settings of an evaluation. shift None: the model's `sample.shift`."""

    sampler: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0  # 1 = no guidance
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # levels t (1 = noise) where CFG applies
    shift: float | None = None

    model_shift: float | None = None  # set by `resolve`: the shift the paper's protocol would use

    def resolve(self, model_shift: float) -> Protocol:
        """The settings with the model's sample shift filled in."""
        shift = model_shift if self.shift is None else self.shift
        interval = tuple(self.guidance_interval)
        return Protocol(self.sampler, self.steps, self.cfg_scale, interval, shift, model_shift)

    def record(self) -> dict[str, object]:
        """What the report states: the settings and whether they are the paper's protocol, i.e. its
        sampler, steps and no guidance at the model's own shift (JSON values, so a record read back from
        a report compares equal)."""
        same = (self.sampler, self.steps, self.cfg_scale) == (PAPER.sampler, PAPER.steps, PAPER.cfg_scale)
        paper = same and (self.shift is None or self.model_shift is None or self.shift == self.model_shift)
        out = {"protocol": "paper" if paper else "custom", **asdict(self)}
        del out["model_shift"]
        return out | {"guidance_interval": list(self.guidance_interval)}


PAPER = Protocol()


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """--steps, --cfg, --guidance-interval, --shift with the paper's defaults (the sampler is Euler)."""
    from selfflow.inference.cli import guidance_interval  # light: argparse only

    p.add_argument("--steps", type=int, default=PAPER.steps, help=f"Euler steps (paper: {PAPER.steps})")
    p.add_argument("--cfg", type=float, default=PAPER.cfg_scale, help="guidance scale (paper: 1 = none)")
    p.add_argument(
        "--guidance-interval",
        type=guidance_interval,
        default=PAPER.guidance_interval,
        metavar="LO,HI",
        help="apply CFG only at levels t in [LO, HI] (t = 1 is noise)",
    )
    p.add_argument("--shift", type=float, help="schedule shift (default: the model's sample.shift)")


def protocol_of(args: argparse.Namespace) -> Protocol:
    return Protocol(PAPER.sampler, args.steps, args.cfg, tuple(args.guidance_interval), args.shift)
