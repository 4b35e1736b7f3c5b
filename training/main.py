#!/usr/bin/env python
"""Train a model: `python training/main.py --config configs/<preset>.yaml [key=value ...]`.

    python training/main.py --config configs/tiny.yaml data.shards=outputs/shards \
        objective.name=self_flow train.max_steps=2000 run.dir=runs/tiny-selfflow

Everything the run writes goes under `run.dir`: config.yaml, metrics.jsonl, tb/ (TensorBoard),
samples/ (fixed-seed grids), checkpoints/ and .lock (held while the run lives: training/runlock.py).
Rerunning the same command resumes from the newest complete checkpoint. Overrides are dotted keys of
`configs/schema.py`; unknown keys are errors.

Several processes: `torchrun --nproc_per_node N training/main.py ...` (dist.engine=ddp), or
`deepspeed --num_gpus N training/main.py ... dist.engine=deepspeed dist.zero_stage=3` (on CPU also set
DS_ACCELERATOR=cpu); train.batch_size is per process. Every rank agrees on skipping a non-finite step
and on stopping for a signal; a resume needs the same number of processes.

Exit status: 0 when done or preempted (SIGTERM, or `train.preempt_signals`: the run saves at the next
step boundary; rerun to resume), 2 for a bad config or missing data, 3 after `train.max_nonfinite`
consecutive NaN/Inf steps (none of which was applied). Exit 2 prints one line `error: ...` for:
- ConfigError: a bad config or override, a checkpoint of another model or process layout, checkpoints
  under run.dir none of which is usable (without train.restart=true);
- FileNotFoundError: missing shards or files;
- DataError (selfflow.data.pipeline): a bad sample under data.strict, or unusable shards; LatentMismatch:
  shards whose stored latents are of another codec or shape than the run's (data.latents);
- CheckpointError / SafetensorError: a checkpoint file that passed the size check but cannot be read;
- MetricsError: a damaged line (not the last) in run.dir/metrics.jsonl;
- RunLocked: run.dir is in use by another live run (the message names its pid, host and start time);
  with several processes every rank stops with it.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from selfflow.configs.extras import check, config_extras, reports_missing_extras

# Nothing heavy at import time: `--help` starts without torch; the config and training stack are
# imported once the arguments are parsed.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a preset name (tiny) or a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to run.dir)")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # the deepspeed launcher's
    return p.parse_args(argv)


def _bad_input() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input (exit 2, one line; see the module docstring)."""
    from safetensors import SafetensorError

    from selfflow.configs.schema import ConfigError
    from selfflow.data.latents import LatentMismatch
    from selfflow.data.pipeline import DataError
    from selfflow.training.checkpoint import CheckpointError
    from selfflow.training.runlock import RunLocked
    from selfflow.training.tracking import MetricsError

    return (
        ConfigError,
        FileNotFoundError,
        DataError,
        LatentMismatch,
        CheckpointError,
        SafetensorError,
        MetricsError,
        RunLocked,
    )


def _fail(e: BaseException, code: int) -> int:
    """Print `error: <message>` on one line (a message's own line breaks become "; ")."""
    print("error: " + "; ".join(line for line in str(e).splitlines() if line.strip()), file=sys.stderr)
    return code


@reports_missing_extras("selfflow-train")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from selfflow.configs.schema import ConfigError, config_to_yaml, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
    except (ConfigError, FileNotFoundError) as e:
        return _fail(e, 2)
    check(*config_extras(cfg))  # before any heavy work
    from selfflow.training.guards import NonFiniteError
    from selfflow.training.loop import train

    try:
        summary = train(cfg, progress=not args.no_progress)
    except _bad_input() as e:
        return _fail(e, 2)
    except NonFiniteError as e:
        return _fail(e, 3)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in ("run_dir", "step", "checkpoint", "preempted")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
