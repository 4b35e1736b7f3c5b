#!/usr/bin/env python
"""Build a captioned media folder from packaged real data: input for make_shards and for evaluation.

    python tools/make_benchmark.py --task class --dataset fashion-mnist --n 500 --seed 0 --out DIR
    python tools/make_benchmark.py --task text  --size full --out DIR        # 5000 signs at 64x256
    python tools/make_benchmark.py --task av    --scene ball --n 100 --duration 3 --out DIR

Writes DIR/<key>.<media> (png, mp4 or flac), DIR/<key>.txt (the caption) and DIR/<key>.json
(ground truth for metrics: the class, the word and its box, the motion, the event times...). The
output depends only on the arguments: the same arguments give the same files, byte for byte (the
mp4s on the same PyAV build). Keys have no dots, so they are valid WebDataset keys.

Tasks (the builders live in selfflow/data/benchmark/):
  class   T2I: Fashion-MNIST images captioned by class ("a photo of an ankle boot")
  text    T2I: a word on a sign (`a sign that says "garden"`), for OCR scoring
  emoji   T2I: a colour emoji on a background ("a red apple on a blue background")
  video   T2V: an object moving or bouncing ("a sneaker moves to the left"), H.264 mp4
  av      T2AV: a bouncing ball with impact sounds, or a digit appearing while a voice says it,
          H.264 + AAC mp4, with the event times for A/V sync scoring
  audio   T2A: a spoken word ("a voice says four"), FLAC
--size tiny|full sets --n, --resolution, --fps, --duration and --sample-rate where they are not given.

The folder is written under a temporary name and renamed into place when complete. An existing
non-empty DIR is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from selfflow.configs.extras import check, reports_missing_extras
from selfflow.data.benchmark.common import Item
from selfflow.data.benchmark.registry import TASKS, parse_args


# ---------------------------------------------------------------------- writing
def _write_items(items: Iterator[Item], folder: Path) -> int:
    count = 0
    for item in items:
        (folder / f"{item.key}.{item.ext}").write_bytes(item.media)
        (folder / f"{item.key}.txt").write_text(item.caption + "\n", encoding="utf-8")
        (folder / f"{item.key}.json").write_text(json.dumps(item.meta, sort_keys=True) + "\n")
        count += 1
    return count


def write_folder(items: Iterator[Item], out: Path, overwrite: bool) -> int:
    """Write every item into a temporary sibling folder, then rename it to `out`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    temp.mkdir()
    try:
        count = _write_items(items, temp)
        if out.exists():
            os.replace(out, old)
        os.replace(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return count


def needs_emoji(args: argparse.Namespace) -> bool:
    """Whether the task draws Noto emoji (their table is read with fontTools: the tools extra)."""
    return args.task == "emoji" or (args.task == "video" and args.source in ("emoji", "mixed"))


@reports_missing_extras("selfflow-make-benchmark")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if needs_emoji(args):
        check("tools")
    try:
        count = write_folder(TASKS[args.task].build(args), args.out, args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} {args.task} samples (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
