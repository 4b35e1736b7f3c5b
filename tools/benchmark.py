#!/usr/bin/env python
"""Convergence benchmark: train every objective under identical conditions, score them at fixed steps.

    python tools/benchmark.py --preset tiny --steps 600 --seeds 2 --out outputs/bench \
        [--shards DIR] [--eval-every 100] [--objectives vanilla,self_flow] [--n 64] [key=value ...]

For each seed k and objective (default: vanilla, dts_only, self_flow, sra, repa) the preset is trained
with `selfflow.training.loop.train` into `<out>/runs/<objective>-seed<k>`: the same model init and data
order (both come from `seed=k`), the preset's p(t), the same step budget; only `objective.name`
differs. Training stops at every evaluation step (a checkpoint is written there), the checkpoint's EMA
model is scored (`tools/benchmark_eval.py`: KID / FID on the class task in the Inception space and in a
random-CNN space, validation loss, probe accuracy), and training resumes, exactly, from it. Evaluations
are stored per run (`benchmark_eval.json`), so rerunning the command skips what is done and resumes
what is not; a larger `--steps` continues the runs.

REPA needs no download: unless overridden it aligns to the packaged FID Inception network
(`objective.repa_encoder=inception`, input sized to the token grid). Without `--shards`, a Fashion-MNIST
class set is built into `<out>/data` (make_benchmark + make_shards, training split, seed 0) with a
held-out validation set from the test split. Outputs: `<out>/results.json`, `<out>/results.md` and
`<out>/curve_<metric>.png`, written atomically. Dotted `key=value` overrides apply to every run.

Exit status: 0 done, 2 bad input (one line on stderr), 3 a run stopped (non-finite steps or preempted:
rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfflow.configs.extras import check, reports_missing_extras
from selfflow.configs.schema import OBJECTIVES, ConfigError  # no torch: --help starts without it
from selfflow.inference.cli import guidance_interval
from selfflow.metrics.protocol import PAPER


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, help="configs/<preset>.yaml (or a YAML file)")
    p.add_argument("--steps", type=int, required=True, help="training steps per run")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. K-1 per objective")
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/, results.*, curves)")
    p.add_argument("--shards", help="training shards (make_shards output); default: built into <out>/data")
    p.add_argument(
        "--val-shards", help="held-out shards for the validation loss (default: built, or --shards)"
    )
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: steps / 4)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated objectives")
    p.add_argument("--n", type=int, default=64, help="class items (samples and real images) per KID / FID")
    p.add_argument(
        "--sample-steps", type=int, default=PAPER.steps, help=f"Euler steps per sample (paper: {PAPER.steps})"
    )
    p.add_argument(
        "--cfg", type=float, default=PAPER.cfg_scale, help="guidance scale of the samples (paper: 1)"
    )
    p.add_argument(
        "--guidance-interval", type=guidance_interval, default=PAPER.guidance_interval, metavar="LO,HI",
        help="apply CFG only at levels t in [LO, HI] (t = 1 is noise)",
    )  # fmt: skip
    p.add_argument("--probe", type=int, default=100, help="probe test images (0: no probe)")
    p.add_argument("--val-batches", type=int, default=4, help="validation batches per evaluation")
    p.add_argument("--data-n", type=int, default=2000, help="training items when building data")
    p.add_argument("--val-n", type=int, default=256, help="validation items when building data")
    p.add_argument("--device", default="auto", help="evaluation device (training: train.device)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    return p.parse_intermixed_args(argv)


@reports_missing_extras("selfflow-benchmark")
def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help, or a one-line usage error
        return int(e.code or 0)
    check("metrics", "tools", "fid")  # scores (FID / KID), curves, REPA's default Inception encoder
    from selfflow.tools.benchmark_run import RunStopped, run
    from selfflow.training.guards import NonFiniteError

    try:
        run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except (RunStopped, NonFiniteError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 3
    print(args.out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
