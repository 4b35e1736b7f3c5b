#!/usr/bin/env python
"""Prompts -> a PNG grid from an EMA snapshot.

    python inference/sample_image.py --prompt 'a sign that says "cat"' --num 8 --out grid.png
    python inference/sample_image.py --ckpt runs/demo --prompts configs/prompts/fashion_mnist.txt

`--ckpt` is a snapshot (tools/export_snapshot.py), a run directory, its checkpoints/ folder or one
checkpoint; the EMA weights and the resolved config saved with them are loaded. Without it, the default
model that ships in assets/default/ (MODEL_CARD.md). Sample i of prompt p uses seed `--seed + index`,
so a sample does not depend on the batch it is drawn in. The grid has one row per prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from selfflow.configs.schema import ConfigError
from selfflow.inference.offload import parse_max_memory
from selfflow.inference.pipeline import Generator, image_grid, load_snapshot, pick_device, save_image
from selfflow.inference.samplers import SAMPLERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ckpt", help="snapshot, run dir, checkpoints/ dir or one checkpoint (default: the shipped model)"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.add_argument("--num", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift of the schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="images per forward batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="of a training checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-memory", help="spread the weights over devices, e.g. 0=20GiB,cpu=48GiB (accelerate)"
    )
    p.add_argument("--offload-dir", type=Path, help="folder for the weights --max-memory leaves out")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(f"prompt file not found: {args.prompts}")
        prompts += [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-empty prompt (--prompt or --prompts)")
    return prompts


def run(args: argparse.Namespace) -> Path:
    prompts = read_prompts(args)
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if args.num < 1 or args.steps < 1 or args.batch < 1:
        raise ValueError("--num, --steps and --batch must be >= 1")
    device = pick_device(args.device)
    budget = parse_max_memory(args.max_memory) if args.max_memory else None
    cfg, model = load_snapshot(args.ckpt, device, args.weights, budget, args.offload_dir)
    gen = Generator(cfg, model, device)
    jobs = [(p, args.seed + i) for p in prompts for i in range(args.num)]
    images = []
    for start in range(0, len(jobs), args.batch):
        chunk = jobs[start : start + args.batch]
        out = gen.generate(
            [p for p, _ in chunk],
            [s for _, s in chunk],
            ("image",),
            args.steps,
            args.sampler,
            args.cfg,
            args.shift,
            progress=not args.quiet,
        )
        images.append(out["image"])
    return save_image(image_grid(torch.cat(images), nrow=args.num), args.out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = run(args)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
