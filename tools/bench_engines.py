#!/usr/bin/env python
"""Step time of each multi-process engine, side by side in one run: `training/main.py` under torchrun
(DeepSpeed's engines too: `dist.engine=deepspeed` works under torchrun) with 2 processes on the same
shards, one engine after the other, in rotating order over rounds.

    python tools/bench_engines.py --preset small --batch 4 --steps 6 --rounds 2

Each launch trains `--steps` Self-Flow steps with `train.log_every=1`; a step's time is the batch over
the samples/s that rank 0 logged for it (data, forward, backward, update, EMA), the first two steps
(warm-up, allocation) left out; the report is the median over the remaining steps of all rounds, and
the ratio to ddp. Machine, torch version and date are printed with the table.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfflow.configs import load_config
from selfflow.data.shards import ShardWriter
from selfflow.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": ["dist.engine=ddp"],
    "fsdp": ["dist.engine=fsdp"],
    "zero2": ["dist.engine=deepspeed", "dist.zero_stage=2"],
    "zero3": ["dist.engine=deepspeed", "dist.zero_stage=3"],
}


def write_shards(folder: Path, size: int, n: int = 64, per_shard: int = 16) -> None:
    """Random size x size PNGs with captions, `per_shard` to a shard (every rank needs its own)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with ShardWriter(folder, "image", max_samples=per_shard) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            w.write({"__key__": f"img_{i:05d}", "png": buf.getvalue(), "txt": f"random picture {i}"})


def step_times(preset: str, engine: str, shards: Path, run_dir: Path, batch: int, steps: int) -> list[float]:
    """Seconds per step of one 2-process launch, after the first two steps."""
    cfg = [f"data.shards={shards}", f"run.dir={run_dir}", f"train.batch_size={batch}",
           f"train.max_steps={steps}", "train.log_every=1", f"train.ckpt_every={10**6}", "sample.every=0",
           "sample.num=1", "sample.steps=1", *ENGINES[engine]]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "training" / "main.py"), "--config", preset, "--no-progress", *cfg]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine}: exit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "samples_per_s" in r]
    return [batch / r["samples_per_s"] for r in rows if r["step"] > 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4, help="samples per process per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default="ddp,fsdp,zero2,zero3")
    args = ap.parse_args(argv)
    engines = args.engines.split(",")
    times: dict[str, list[float]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        spec = load_config(args.preset).spec
        write_shards(shards, max(spec.image_width, spec.image_height))
        for r in range(args.rounds):
            order = engines[r % len(engines) :] + engines[: r % len(engines)]
            for engine in order:
                times[engine] += step_times(
                    args.preset, engine, shards, Path(tmp) / f"{engine}-{r}", args.batch, args.steps
                )
                print(f"round {r + 1}: {engine} done", file=sys.stderr)
    base = statistics.median(times[engines[0]])
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}")
    print(
        f"preset {args.preset}, 2 processes x batch {args.batch}, fp32, steps 3..{args.steps} of each launch"
    )
    print(f"| engine | s / step | ratio to {engines[0]} |\n|---|---|---|")
    for engine in engines:
        med = statistics.median(times[engine])
        print(f"| {engine} | {med:.2f} | {med / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
