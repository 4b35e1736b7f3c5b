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
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from selfflow.data.atomic import write_atomic
from selfflow.data.decode import LIMITS, DecodeLimits, parse_size
from selfflow.data.inputs import fingerprint, scan_inputs
from selfflow.data.latents import LatentOptions, check_latents
from selfflow.data.prepare import TASKS, Outcome, Target, prepare
from selfflow.data.shardrun import ShardRun
from selfflow.data.shards import ShardLimits
from selfflow.data.shardsets import MANIFEST, Progress, TaskShards, remove_stale, sample_stats, verify
from selfflow.data.tarinputs import Staged, check_sources, stage_tars, tar_sources
from selfflow.tokenizers.spec import ClipSpec

SKIPPED = "skipped.jsonl"
STAGING = ".staging"  # input shards, unpacked (removed at the end)
FORMAT = "selfflow-shards/2"


# ---------------------------------------------------------------------- building


def check_output(output: Path, source: str, shards: list[str]) -> None:
    if output.resolve() == Path(source).resolve():
        raise ValueError(f"--output {output} must differ from --input")
    check_sources(shards, output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to output folder {output}: {err.strerror or err}") from err


def build(args: argparse.Namespace, work: Callable[..., Outcome] = prepare) -> str:
    """Scan, validate, write shards, skipped.jsonl and manifest.json; returns a summary line. Input
    shards are staged in OUT/.staging (data/tarinputs.py), removed at the end: it is a copy of the media."""
    began = time.perf_counter()
    shards = tar_sources(args.input)  # None: a media folder or a manifest
    if shards is None:
        entries, skips = scan_inputs(Path(args.input))
        staged = Staged(entries, skips, fingerprint(Path(args.input), entries))
    check_output(args.output, args.input, shards or [])
    try:
        if shards is not None:
            staged = stage_tars(shards, args.output / STAGING, args.limits, args.caption_key, args.quiet)
        return _write(args, work, staged, began)
    finally:
        shutil.rmtree(args.output / STAGING, ignore_errors=True)


def _write(args: argparse.Namespace, work: Callable[..., Outcome], staged: Staged, began: float) -> str:
    """The part of `build` after scanning: the same for every kind of input."""
    entries, skips = staged.entries, staged.skips
    (args.output / MANIFEST).unlink(missing_ok=True)  # written again at the end; until then, none is true
    limits = ShardLimits(args.shard_samples, args.shard_mb)
    options = {"format": FORMAT, "target": asdict(args.target), "limits": asdict(limits)}
    options["decode_limits"] = asdict(args.limits)  # other limits may accept other inputs
    if args.latent_options is not None:
        check_latents(args.latent_options)
        options["latents"] = args.latent_options.stamp()
    progress = Progress(args.output, staged.fingerprint + json.dumps(options, sort_keys=True))
    sets = {
        t: TaskShards(args.output, t, limits, progress.shards.get(t, {}), progress.record_shard)
        for t in TASKS
    }
    try:
        run = ShardRun(entries, args.target, progress, sets, args.latent_options, args.workers, args.quiet)
        run = replace(run, limits=args.limits, timeout=args.timeout, work=work)
        failed, accepted = run.write()
        shards = {task: infos for task, s in sets.items() if (infos := s.close())}
    finally:
        for s in sets.values():
            s.abort()  # an unfinished shard's temporary file (nothing after close())
        progress.close()
    remove_stale(args.output, shards)
    skips = sorted(staged.locate(skips + failed), key=lambda s: (s.path, s.reason))
    write_atomic(args.output / SKIPPED, "".join(json.dumps(asdict(s)) + "\n" for s in skips))
    counts = {task: sum(info.samples for info in infos) for task, infos in shards.items()}
    if not counts:
        raise ValueError(
            f"no valid samples in {args.input} ({len(skips)} skipped, see {args.output / SKIPPED})"
        )
    manifest = {
        "format": FORMAT,
        "counts": counts,
        "skipped": len(skips),
        **sample_stats(accepted),
        "spec": {**asdict(args.target), "preset": args.spec},
        "latents": args.latent_options.record() if args.latent_options else {},
        "shards": {task: [info.to_json() for info in infos] for task, infos in shards.items()},
        "args": _args_record(args),
    }
    write_atomic(args.output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    written = ", ".join(f"{n} {task} samples in {len(shards[task])} shard(s)" for task, n in counts.items())
    kept = sum(s.kept for s in sets.values())
    seconds = time.perf_counter() - began
    return (
        f"wrote {written} to {args.output}; skipped {len(skips)} (see {args.output / SKIPPED}); "
        f"{kept} shard(s) kept from an earlier run; {len(entries)} inputs in {seconds:.1f}s"
    )


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
    return Target(**(base | {k: v for k, v in given.items() if v is not None}), no_audio=args.no_audio)


def _latent_options(args: argparse.Namespace, spec: ClipSpec) -> LatentOptions:
    """The preset's spec with the explicit options applied: the geometry the codecs must fit."""
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


def _args_record(args: argparse.Namespace) -> dict:
    skip = ("target", "latent_options", "limits", "quiet", "verify", "workers", "timeout")
    record = {k: v for k, v in vars(args).items() if k not in skip}
    for key in ("size", "video_size"):
        record[key] = None if record[key] is None else "{}x{}".format(*record[key])
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.input is None and not args.verify:
        parser.error("--input is required unless only --verify is asked for")
    try:
        spec = None
        if args.spec is not None:
            from selfflow.configs import load_config  # local import: configs pull in torch (seconds)

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
