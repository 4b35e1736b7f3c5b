"""What the sampling CLIs (`sample_image.py`, `sample_av.py`, `sample_video.py`) share: the model and
sampler options, prompt reading, and loading the model the options name.

Nothing heavy is imported at module level, so every sampling command's `--help` starts without torch;
`check_sampling` and `load_model` import the inference stack when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from selfflow.configs.schema import Config
    from selfflow.inference.pipeline import Generator
    from selfflow.models.mmdit import MMDiT

SAMPLER_NAMES = (
    "euler",
    "heun",
    "euler_maruyama",
)  # inference/samplers.py SAMPLERS (a test keeps them equal)


def guidance_interval(text: str) -> tuple[float, float]:
    """'LO,HI' -> (lo, hi) with 0 <= lo <= hi <= 1: the levels t (1 = noise) where CFG applies."""
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers in [0, 1]), got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"need 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def add_sampling_args(p: argparse.ArgumentParser, cfg_scale: float = 3.0) -> None:
    """--model (alias --ckpt), --steps, --sampler, --cfg, --guidance-interval, --shift, --device, --quiet,
    --max-memory, --offload-dir."""
    p.add_argument(
        "--model",
        "--ckpt",
        dest="ckpt",
        help="a Hugging Face model folder or snapshot (tools/export_snapshot.py), a run dir, its "
        "checkpoints/ dir or one checkpoint (default: the shipped model)",
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler", help=f"one of {', '.join(SAMPLER_NAMES)}")
    p.add_argument(
        "--cfg", type=float, default=cfg_scale, help=f"classifier-free guidance scale (1 = off; {cfg_scale})"
    )
    p.add_argument(
        "--guidance-interval",
        type=guidance_interval,
        default=(0.0, 1.0),
        metavar="LO,HI",
        help="apply CFG only at levels t in [LO, HI] (t = 1 is noise; default 0,1: every step)",
    )
    p.add_argument(
        "--shift", type=float, help="timestep shift of the schedule (default: the model's sample.shift)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-memory", help="spread the weights over devices, e.g. 0=20GiB,cpu=48GiB (accelerate)"
    )
    p.add_argument("--offload-dir", type=Path, help="folder for the weights --max-memory leaves out")


def sampling_settings(args: argparse.Namespace) -> dict[str, object]:
    """The sampler settings of the options, as recorded next to every output."""
    lo, hi = args.guidance_interval
    return {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "guidance_interval": [lo, hi],
            "shift": args.shift}  # fmt: skip


def generate(
    gen: Generator,
    args: argparse.Namespace,
    prompts: list[str],
    seeds: list[int],
    modalities: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """`Generator.generate` with the sampler options of the command line."""
    return gen.generate(prompts, seeds, modalities, args.steps, args.sampler, args.cfg, args.shift,
                        args.guidance_interval, progress=not args.quiet)  # fmt: skip


def read_prompts(given: list[str], path: Path | None) -> list[str]:
    """The --prompt values, then the non-blank lines of the --prompts file; at least one, none empty."""
    prompts = list(given)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-empty prompt (--prompt or --prompts)")
    return prompts


def check_sampling(args: argparse.Namespace) -> None:
    from selfflow.inference.samplers import SAMPLERS

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")


def load_model(args: argparse.Namespace, weights: str = "ema") -> tuple[Path, Config, MMDiT, torch.device]:
    """(the resolved folder or checkpoint, its config, the model, the device) of the options."""
    from selfflow.inference.pipeline import load_snapshot, pick_device, resolve_model

    device = pick_device(args.device)
    path = resolve_model(args.ckpt)
    budget = None
    if args.max_memory:
        from selfflow.inference.offload import parse_max_memory  # accelerate: only on this path

        budget = parse_max_memory(args.max_memory)
    cfg, model = load_snapshot(path, device, weights, budget, args.offload_dir)
    if args.shift is None:  # the shift the model was made to sample with (its codec's, paper App. A.4)
        args.shift = cfg.sample.shift
    return path, cfg, model, device
