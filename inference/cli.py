"""What the sampling CLIs (`sample_image.py`, `sample_av.py`, `sample_video.py`) share: the model and
sampler options, prompt reading, and loading the model the options name."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from selfflow.configs.schema import Config
from selfflow.inference.offload import parse_max_memory
from selfflow.inference.pipeline import load_snapshot, pick_device, resolve_model
from selfflow.inference.samplers import SAMPLERS
from selfflow.models.mmdit import MMDiT


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--ckpt, --steps, --sampler, --cfg, --shift, --device, --quiet, --max-memory, --offload-dir."""
    p.add_argument(
        "--ckpt", help="snapshot, run dir, checkpoints/ dir or one checkpoint (default: the shipped model)"
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift of the schedule")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-memory", help="spread the weights over devices, e.g. 0=20GiB,cpu=48GiB (accelerate)"
    )
    p.add_argument("--offload-dir", type=Path, help="folder for the weights --max-memory leaves out")


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
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")


def load_model(args: argparse.Namespace, weights: str = "ema") -> tuple[Path, Config, MMDiT, torch.device]:
    """(resolved snapshot or checkpoint, config, model, device) of the options."""
    device = pick_device(args.device)
    path = resolve_model(args.ckpt)
    budget = parse_max_memory(args.max_memory) if args.max_memory else None
    cfg, model = load_snapshot(path, device, weights, budget, args.offload_dir)
    return path, cfg, model, device
