#!/usr/bin/env python
"""Time one training step (forward, backward, AdamW, EMA) per objective, side by side in one process.

    python tools/bench_step.py --preset small --objectives vanilla dts_only self_flow --batch 8

Objectives are timed in interleaved rounds (A B C A B C ...) so that load changes on a shared machine
hit all of them alike; the median over rounds is reported with its ratio to the first objective.
The batch is random media of the chosen task (step time does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from selfflow.configs import load_config
from selfflow.data.pipeline import TASK_MODALITIES
from selfflow.training.loop import build_trainer, make_batch, train_step


def random_media(spec, task: str, batch: int) -> dict[str, torch.Tensor]:
    mods = TASK_MODALITIES[task]
    shapes = {
        "image": (spec.video_channels, spec.image_height, spec.image_width),
        "video": (spec.video_channels, spec.num_frames, spec.height, spec.width),
        "audio": (spec.audio_channels, spec.num_samples),
    }
    gen = torch.Generator().manual_seed(0)
    return {m: torch.rand(batch, *shapes[m], generator=gen) * 2 - 1 for m in mods}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(args: argparse.Namespace) -> dict:
    trainers, batches = {}, {}
    for name in args.objectives:
        cfg = load_config(
            args.preset, [f"objective.name={name}", f"train.device={args.device}", *args.overrides]
        )
        tr = build_trainer(cfg)
        trainers[name] = tr
        batches[name] = make_batch(
            tr, random_media(cfg.spec, args.task, args.batch), ["a photo of a bag"] * args.batch
        )
        for _ in range(args.warmup):
            train_step(tr, batches[name])
        sync(tr.device)
    times: dict[str, list[float]] = {name: [] for name in args.objectives}
    for _ in range(args.rounds):
        for name, tr in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(tr, batches[name])
            sync(tr.device)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times[args.objectives[0]])
    return {
        "preset": args.preset,
        "task": args.task,
        "batch": args.batch,
        "device": str(next(iter(trainers.values())).device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "seconds_per_step": {n: statistics.median(t) for n, t in times.items()},
        "ratio": {n: statistics.median(t) / base for n, t in times.items()},
        "rounds": times,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--objectives", nargs="+", default=["vanilla", "dts_only", "self_flow"])
    p.add_argument("--task", default="image", choices=sorted(TASK_MODALITIES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per objective per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="config overrides for every objective")
    result = bench(p.parse_args(argv))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
