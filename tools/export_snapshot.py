#!/usr/bin/env python
"""Export a training checkpoint's EMA weights as a snapshot (safetensors + config JSON + sha256), the
folder inference loads:

    python tools/export_snapshot.py runs/av --out snapshots/av [--dtype float32] [--weights model]

The source is a run directory, its checkpoints/ folder or one checkpoint (the latest complete one is
used). The snapshot is written beside --out and renamed into place, so a failed export changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPE_NAMES = ("float16", "bfloat16", "float32")  # inference/snapshot.py DTYPES, named without torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="run dir, checkpoints/ dir or one checkpoint")
    p.add_argument("--out", type=Path, required=True, help="snapshot folder")
    p.add_argument("--dtype", default="float16", choices=DTYPE_NAMES)
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights to export")
    args = p.parse_args(argv)
    from selfflow.inference.snapshot import INFO, export_snapshot  # here, not above: --help needs no torch

    try:
        out = export_snapshot(args.ckpt, args.out, args.dtype, args.weights)
    except (FileNotFoundError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    info = json.loads((out / INFO).read_text())
    print(f"{out}: step {info['step']}, {info['dtype']}, sha256 {info['sha256'][:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
