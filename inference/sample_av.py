#!/usr/bin/env python
"""Prompt -> a synchronized video+audio clip: video and audio tokens are sampled jointly, in one
sequence, then decoded and muxed into an mp4 (H.264 + AAC), with the wav, a PNG contact sheet of
the frames and a JSON sidecar of how it was made.

    python inference/sample_av.py --prompt "a ball bounces three times" --out ball.mp4
    python inference/sample_av.py --model runs/av --prompts prompts.txt --out clips/av.mp4

`--model` (alias `--ckpt`) is a model folder (tools/export_snapshot.py), a run directory, its
checkpoints/ folder or one checkpoint (the EMA weights are used); without it, the default model that
ships in assets/default/ (MODEL_CARD.md).
`--duration`, `--fps` and `--size HxW` change the clip spec the model was trained with (positions are
rotary, so other lengths work, with quality best near the training spec). `--prompts file.txt` makes
one clip per line: `<out stem>_000.mp4`, ... Every file is written to a temporary name and renamed,
so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selfflow.configs.extras import MissingExtra
from selfflow.inference.cli import add_sampling_args, generate, read_prompts, sampling_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--out", type=Path, default=Path("clip.mp4"))
    p.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    p.add_argument("--duration", type=float, help="seconds (default: the model's spec)")
    p.add_argument("--fps", type=float, help="frames per second (default: the model's spec)")
    p.add_argument("--size", help="HxW (default: the model's spec)")
    p.add_argument("--batch", type=int, default=4, help="clips sampled together")
    add_sampling_args(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace, modalities: tuple[str, ...] = ("video", "audio")) -> list[Path]:
    # imported here, not above: --help starts without torch
    from selfflow.data.shards import sha256_file
    from selfflow.inference.cli import check_sampling, load_model
    from selfflow.inference.clips import clip_spec, write_clip
    from selfflow.inference.pipeline import Generator, weights_file

    prompts = read_prompts(args.prompt, args.prompts)
    check_sampling(args)
    if args.out.suffix != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)  # fail before sampling, not after
    if not os.access(args.out.parent, os.W_OK):
        raise PermissionError(f"cannot write to {args.out.parent}")
    ckpt, cfg, model, device = load_model(args)
    cfg = clip_spec(cfg, args)
    digest = sha256_file(weights_file(ckpt))
    gen = Generator(cfg, model, device)
    common = {**sampling_settings(args), "model_sha256": digest, "checkpoint": str(ckpt),
              "duration": cfg.spec.duration, "fps": cfg.spec.fps, "size": [cfg.spec.height, cfg.spec.width],
              "sample_rate": cfg.spec.sample_rate}  # fmt: skip
    outs = []
    for first in range(0, len(prompts), args.batch):  # clip i uses seed + i, whatever the batch
        chunk = prompts[first : first + args.batch]
        seeds = [args.seed + first + j for j in range(len(chunk))]
        media = generate(gen, args, chunk, seeds, modalities)
        for j, (prompt, seed) in enumerate(zip(chunk, seeds, strict=True)):
            i = first + j
            out = args.out if len(prompts) == 1 else args.out.with_name(f"{args.out.stem}_{i:03d}.mp4")
            audio = media["audio"][j] if "audio" in media else None
            write_clip(out, media["video"][j], audio, cfg, {"prompt": prompt, "seed": seed, **common})
            outs.append(out)
    return outs


def main(argv: list[str] | None = None, modalities: tuple[str, ...] = ("video", "audio")) -> int:
    args = parse_args(argv)
    command = "selfflow-sample-video" if "audio" not in modalities else "selfflow-sample-av"
    try:
        outs = run(args, modalities)
    except MissingExtra as e:  # e.g. a model with a frozen T5 encoder, without the encoders extra
        print(e.line(command), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:  # ConfigError is a ValueError
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(str(o) for o in outs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
