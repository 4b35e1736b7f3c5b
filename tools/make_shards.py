#!/usr/bin/env python
"""Pack captioned images, videos and audio into WebDataset shards, one shard set per task.

    python tools/make_shards.py --input DIR_OR_MANIFEST --output OUT [--spec tiny] [--workers 4] [--verify]
    python tools/make_shards.py --output OUT --verify      # only check existing shards

Input: a folder (`x.jpg` / `x.mp4` / `x.wav` / `x.flac` + caption `x.txt`, optional `x.json`), or a
JSONL / CSV manifest with `path`, `caption` and optional `key` and metadata (see `data/inputs.py`), or
existing WebDataset shards (img2dataset, video2dataset, ...): a folder of `.tar` files, a glob, a brace
pattern `DIR/{00000..00009}.tar`, or a URL `pipe:cat DIR/{0..3}.tar` / `file:` / `http(s):`. A shard
sample needs a media field and a caption (`txt`, `caption`, or the `--caption-key` of its `json`); its
samples are staged in OUT/.staging and validated like a folder's files (see `data/tarinputs.py`), and a
bad sample is listed as `<shard>:<key>`, an unreadable shard as `<shard>`.

Output in OUT: `image-000000.tar`, `video-...`, `audio-...`, `av-...` (an mp4 with an audio track goes
to `av`, one without to `video`); each sample holds `__key__`, its media (`png` / `jpg` / `webp`,
`mp4`, or `flac`), `txt` and `json`. `manifest.json` records counts, resolutions, durations, the
options and every shard's sample count and sha256; `skipped.jsonl` lists each rejected input with its
reason; `progress.jsonl` lets an interrupted run resume. Every input is decoded before it is written.

`--size` / `--video-size` / `--fps` / `--duration` / `--sample-rate`, or `--spec PRESET` for all of them
from a config's clip spec, re-encode media to that shape (see `data/prepare.py`); without them the
original bytes are stored. `--no-audio` sends every mp4 to `video` without its audio track;
`--latents DIR` adds codec latents (`data/latents.py`). Reruns with the same arguments rewrite nothing
that is already correct, and the shards are byte-identical whatever `--workers` or interruptions
happened (given a deterministic encoder: see `data/avio.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

# light: --help starts without torch (the building modules import it; see main)
from selfflow.data.decode import LIMITS, DecodeLimits, parse_size
from selfflow.tokenizers.spec import ClipSpec

if TYPE_CHECKING:
    from selfflow.data.latents import LatentOptions
    from selfflow.data.prepare import Outcome, Target


# ---------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(kind: type) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    return parse


def _parser() -> _Parser:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        help="folder of media + .txt (+ .json), a .jsonl / .csv manifest, or WebDataset shards: a folder of "
        ".tar files, a glob, a brace pattern (DIR/{00000..00009}.tar) or a URL (pipe:cmd, file:, http:)",
    )
    p.add_argument("--caption-key", default="caption", help="key of the caption in a shard sample's json")
    p.add_argument("--output", type=Path, required=True, help="folder for shards and manifest")
    p.add_argument("--shard-samples", type=_positive(int), help="at most this many samples per shard")
    p.add_argument(
        "--shard-mb", type=_positive(float), default=256.0, help="about this many MB per shard at most"
    )
    p.add_argument("--spec", help="config preset (tiny) or YAML whose clip spec sets the 5 options below")
    p.add_argument("--size", type=_size, help="resize and centre-crop images to HxW (PNG)")
    p.add_argument("--video-size", type=_size, help="re-encode videos at HxW (even numbers)")
    p.add_argument("--fps", type=_positive(float), help="re-encode videos at this frame rate")
    p.add_argument(
        "--duration", type=_positive(float), help="cut video / audio into clips of this many seconds"
    )
    p.add_argument("--sample-rate", type=_positive(int), help="re-encode audio at this rate (Hz)")
    p.add_argument(
        "--no-audio", action="store_true", help="drop mp4 audio tracks: every mp4 is a video sample"
    )
    p.add_argument(
        "--latents",
        action="append",
        metavar="[MODALITY=]DIR",
        help="also store latents from this diffusers autoencoder folder (needs --spec; repeatable; "
        "video=DIR names the modality of a folder whose class codes several)",
    )
    p.add_argument("--workers", type=_positive(int), default=1, help="processes decoding / encoding inputs")
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=600.0,
        help="seconds one input may take in a worker (--workers > 1) before it is skipped",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a decoding limit (data.limits.KEY of the config, e.g. max_duration_s=7200); repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verify", action="store_true", help="re-read the shards and check the manifest")
    return p


def _target(args: argparse.Namespace, spec: ClipSpec | None) -> Target:
    """The re-encoding target: the preset's clip spec (if any), overridden by explicit options."""
    base: dict = {}
    if spec is not None:
        base = {
            "image_size": (spec.image_height, spec.image_width),
            "video_size": (spec.height, spec.width),
            "fps": spec.fps,
            "duration": spec.duration,
            "sample_rate": spec.sample_rate,
            "audio_channels": spec.audio_channels,
        }
    given = {
        "image_size": args.size,
        "video_size": args.video_size,
        "fps": args.fps,
        "duration": args.duration,
        "sample_rate": args.sample_rate,
    }
    from selfflow.data.prepare import Target

    return Target(**(base | {k: v for k, v in given.items() if v is not None}), no_audio=args.no_audio)


def _latent_options(args: argparse.Namespace, spec: ClipSpec) -> LatentOptions:
    """The preset's spec with the explicit options applied: the geometry the codecs must fit."""
    from selfflow.data.latents import LatentOptions

    t = args.target
    spec = replace(
        spec,
        duration=t.duration,
        fps=t.fps,
        height=t.video_size[0],
        width=t.video_size[1],
        sample_rate=t.sample_rate,
        image_height=t.image_size[0],
        image_width=t.image_size[1],
    )
    return LatentOptions(tuple(args.latents), spec)


def _check_target(target: Target) -> str | None:
    if target.video_size is not None and any(n % 2 for n in target.video_size):
        return f"--video-size {target.video_size[0]}x{target.video_size[1]} must be even (H.264 yuv420p)"
    for rate, what in ((target.fps, "--fps"), (target.sample_rate, "--sample-rate")):
        frames = None if rate is None or target.duration is None else target.duration * rate
        if frames is not None and abs(frames - round(frames)) > 1e-6:
            return f"--duration {target.duration:g} is not a whole number of frames at {what} {rate:g}"
    return None


def _limits(items: list[str], base: DecodeLimits) -> DecodeLimits:
    """`--limit key=value` pairs over `base` (the preset's data.limits, or the defaults)."""
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        default = getattr(base, key.strip(), None)
        if not value or default is None or key.startswith("_"):
            names = ", ".join(f.name for f in dataclasses.fields(DecodeLimits))
            raise ValueError(f"--limit {item!r} is not KEY=VALUE with KEY one of {names}")
        if isinstance(default, list):
            changes[key.strip()] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            changes[key.strip()] = type(default)(value)
    return dataclasses.replace(base, **changes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.input is None and not args.verify:
        parser.error("--input is required unless only --verify is asked for")
    try:
        spec = None
        if args.spec is not None:
            from selfflow.configs import load_config

            cfg = load_config(args.spec)
            spec = cfg.spec
        args.target = _target(args, spec)
        args.limits = _limits(args.limit, base=cfg.data.limits if args.spec is not None else LIMITS)
        problem = _check_target(args.target)
        if problem:
            parser.error(problem)
        if args.latents and spec is None:
            parser.error("--latents needs --spec: the clip geometry the autoencoder is checked against")
        args.latent_options = _latent_options(args, spec) if args.latents else None
    except ValueError as err:
        parser.error(str(err).splitlines()[0])
    return args


def build(args: argparse.Namespace, work: Callable[..., Outcome] | None = None) -> str:
    """Write the shard set the arguments describe (tools/make_shards_build.py); returns a summary line.
    `work` replaces the per-input preparation (data/prepare.py `prepare`), e.g. in tests."""
    from selfflow.tools import make_shards_build

    return make_shards_build.build(args, work or make_shards_build.prepare)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from selfflow.data.shardsets import verify

    try:
        if args.input is not None:
            print(build(args))
        if args.verify:
            problems = verify(args.output)
            for problem in problems:
                print(f"verify: {problem}", file=sys.stderr)
            if problems:
                return 1
            print(f"verify: {args.output} matches its manifest")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to finish (finished shards are kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
