#!/usr/bin/env python
"""Data pipeline throughput against the training step's consumption, on the same machine.

    python tools/bench_data.py --preset small --task av --clips 48 [--shards DIR]

`--workers N` reads through N DataLoader processes (the shard set needs at least N shards).
Without --shards, writes `--clips` spec-shaped AV clips (a moving square with a click per bounce,
H.264 + AAC) into a temporary shard set first. Reports the pipeline's samples/s and tokens/s (one
process, no workers) and the `self_flow` training step's samples/s at `--batch` for the same task.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from selfflow.configs import load_config
from selfflow.data.avio import encode_mp4
from selfflow.data.pipeline import TASK_MODALITIES, DataPipeline, WorkerPipeline
from selfflow.data.shards import ShardWriter


def moving_square(i: int, spec) -> tuple[np.ndarray, np.ndarray]:
    """[T, H, W, 3] uint8 frames and [1, N] float32 audio: a square sliding right, a click per frame 4."""
    frames = np.zeros((spec.num_frames, spec.height, spec.width, 3), np.uint8)
    audio = np.zeros((spec.audio_channels, spec.num_samples), np.float32)
    side = spec.height // 4
    for f in range(spec.num_frames):
        x = (i * 3 + f * 2) % (spec.width - side)
        frames[f, side : 2 * side, x : x + side] = (255, 200 - f % 50, 40 * (i % 6))
        if f % 4 == 0:
            s = round(f / spec.fps * spec.sample_rate)
            audio[:, s : s + 160] = 0.7
    return frames, audio


def write_clips(folder: Path, spec, clips: int) -> float:
    """Write clips as an `av` shard set; returns clips encoded per second."""
    start = time.perf_counter()
    with ShardWriter(folder, "av", max_samples=16) as w:
        for i in range(clips):
            frames, audio = moving_square(i, spec)
            mp4 = encode_mp4(frames, spec.fps, audio, spec.sample_rate)
            w.write({"__key__": f"clip_{i:05d}", "mp4": mp4, "txt": "a square slides to the right"})
    return clips / (time.perf_counter() - start)


def pipeline_rate(shards: Path, spec, task: str, batch: int, batches: int, workers: int = 0) -> dict:
    kwargs = dict(shards=shards, spec=spec, seed=0, weights={task: 1.0}, batch_size=batch)
    pipe = WorkerPipeline(kwargs, workers) if workers > 0 else DataPipeline(**kwargs)
    next(pipe)  # open files, warm caches
    start = time.perf_counter()
    for _ in range(batches):
        next(pipe)
    rate = batch * batches / (time.perf_counter() - start)
    tokens = sum(spec.tokens(m) for m in TASK_MODALITIES[task])
    return {"samples_per_s": rate, "tokens_per_s": rate * tokens}


def training_rate(preset: str, task: str, batch: int) -> float:
    from selfflow.tools.bench_step import bench

    args = argparse.Namespace(
        preset=preset,
        objectives=["self_flow"],
        task=task,
        batch=batch,
        steps=2,
        rounds=2,
        warmup=1,
        device="auto",
        overrides=[],
    )
    return batch / bench(args)["seconds_per_step"]["self_flow"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--task", default="av", choices=sorted(TASK_MODALITIES))
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shards", type=Path, help="an existing make_shards output folder")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: main process)")
    p.add_argument("--batches", type=int, default=0, help="batches to time (default: about one pass)")
    args = p.parse_args(argv)
    spec = load_config(args.preset).spec
    with tempfile.TemporaryDirectory() as tmp:
        result: dict = {"preset": args.preset, "task": args.task, "batch": args.batch}
        shards = args.shards
        if shards is None:
            shards = Path(tmp)
            result["encode_clips_per_s"] = write_clips(shards, spec, args.clips)
        result["pipeline"] = pipeline_rate(
            shards, spec, args.task, args.batch, max(args.clips // args.batch - 1, 2)
        )
    result["train_samples_per_s"] = training_rate(args.preset, args.task, args.batch)
    result["pipeline_over_train"] = result["pipeline"]["samples_per_s"] / result["train_samples_per_s"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
