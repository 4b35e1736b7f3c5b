#!/usr/bin/env python
"""Prompts -> a PNG grid from an EMA snapshot.

    python inference/sample_image.py --prompt 'a sign that says "cat"' --num 8 --out grid.png
    python inference/sample_image.py --model runs/demo --prompts configs/prompts/fashion_mnist.txt

`--model` (alias `--ckpt`) is a model folder (tools/export_snapshot.py), a run directory, its
checkpoints/ folder or one checkpoint; the EMA weights and the resolved config saved with them are
loaded. Without it, the default model that ships in assets/default/ (MODEL_CARD.md). Sample i of prompt
p uses seed `--seed + index`, so a sample does not depend on the batch it is drawn in. The grid has one
row per prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfflow.configs.extras import reports_missing_extras
from selfflow.inference.cli import add_sampling_args, check_sampling, generate, load_model, read_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.add_argument("--num", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="images per forward batch")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="of a training checkpoint")
    add_sampling_args(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    import torch  # imported here, not above: --help starts without torch

    from selfflow.inference.pipeline import Generator, image_grid, save_image

    prompts = read_prompts(args.prompt, args.prompts)
    check_sampling(args)
    if args.num < 1:
        raise ValueError("--num must be >= 1")
    _, cfg, model, device = load_model(args, args.weights)
    gen = Generator(cfg, model, device)
    jobs = [(p, args.seed + i) for p in prompts for i in range(args.num)]
    images = []
    for start in range(0, len(jobs), args.batch):
        chunk = jobs[start : start + args.batch]
        out = generate(gen, args, [p for p, _ in chunk], [s for _, s in chunk], ("image",))
        images.append(out["image"])
    return save_image(image_grid(torch.cat(images), nrow=args.num), args.out)


@reports_missing_extras("selfflow-sample-image")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = run(args)
    except (FileNotFoundError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
