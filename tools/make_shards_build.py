"""Writing a shard set (tools/make_shards.py is its command line): scan or stage the inputs, validate
and re-encode them in workers, write shards, skipped.jsonl and the manifest."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from selfflow.data.atomic import write_atomic
from selfflow.data.inputs import fingerprint, scan_inputs
from selfflow.data.latents import check_latents
from selfflow.data.prepare import TASKS, Outcome, prepare
from selfflow.data.shardrun import ShardRun
from selfflow.data.shards import ShardLimits
from selfflow.data.shardsets import MANIFEST, Progress, TaskShards, remove_stale, sample_stats
from selfflow.data.tarinputs import Staged, check_sources, stage_tars, tar_sources

SKIPPED = "skipped.jsonl"
STAGING = ".staging"  # input shards, unpacked (removed at the end)
FORMAT = "selfflow-shards/2"


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
        "args": args_record(args),
    }
    write_atomic(args.output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    written = ", ".join(f"{n} {task} samples in {len(shards[task])} shard(s)" for task, n in counts.items())
    kept = sum(s.kept for s in sets.values())
    seconds = time.perf_counter() - began
    return (
        f"wrote {written} to {args.output}; skipped {len(skips)} (see {args.output / SKIPPED}); "
        f"{kept} shard(s) kept from an earlier run; {len(entries)} inputs in {seconds:.1f}s"
    )


def args_record(args: argparse.Namespace) -> dict:
    skip = ("target", "latent_options", "limits", "quiet", "verify", "workers", "timeout")
    record = {k: v for k, v in vars(args).items() if k not in skip}
    for key in ("size", "video_size"):
        record[key] = None if record[key] is None else "{}x{}".format(*record[key])
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}
