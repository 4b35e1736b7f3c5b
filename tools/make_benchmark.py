#!/usr/bin/env python
"""Build a captioned media folder from packaged real data: input for make_shards and for evaluation.

    python tools/make_benchmark.py --task class --dataset fashion-mnist --n 500 --seed 0 --out DIR

Writes DIR/<key>.<media> (png for images), DIR/<key>.txt (the caption) and DIR/<key>.json
(ground truth for metrics, e.g. {"label": 7, "class": "sneaker", ...}). The selection depends only
on the seed: the same arguments give the same files, byte for byte. Keys have no dots, so they are
valid WebDataset keys.

Tasks:
  class   one image per sample, captioned by its class ("a photo of an ankle boot"); drawn evenly
          over the classes.
Later tasks (rendered text, emoji, video, audio-video) each add a builder to TASKS.

The folder is written under a temporary name and renamed into place when complete. An existing
non-empty DIR is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from selfflow.data.decode import png_bytes
from selfflow.data.packaged import FASHION_MNIST_CLASSES, fashion_mnist_caption, load_fashion_mnist


@dataclass(frozen=True)
class Item:
    key: str  # file stem, no dots
    media: bytes
    ext: str  # media file extension: "png" (later "mp4", "flac")
    caption: str
    meta: dict  # written as <key>.json


# ---------------------------------------------------------------------- task "class"
@dataclass(frozen=True)
class ClassDataset:
    load: Callable[[str], tuple[np.ndarray, np.ndarray]]  # split -> images uint8 [N, H, W], labels [N]
    classes: tuple[str, ...]
    caption: Callable[[int], str]
    key_prefix: str


CLASS_DATASETS = {
    "fashion-mnist": ClassDataset(load_fashion_mnist, FASHION_MNIST_CLASSES, fashion_mnist_caption, "fmnist"),
}


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices drawn round-robin over the classes (in a random class order), each class's
    samples in random order, so class counts differ by at most one (while every class lasts)."""
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    class_order = rng.permutation(len(pools))
    depth = max(len(pool) for pool in pools)
    rounds = ((pools[c][r] for c in class_order if r < len(pools[c])) for r in range(depth))
    return np.fromiter(itertools.islice(itertools.chain.from_iterable(rounds), n), dtype=np.int64, count=n)


def class_items(args: argparse.Namespace) -> Iterator[Item]:
    if args.dataset not in CLASS_DATASETS:
        raise ValueError(
            f"task 'class' has no dataset {args.dataset!r}; choose from {sorted(CLASS_DATASETS)}"
        )
    source = CLASS_DATASETS[args.dataset]
    images, labels = source.load(args.split)  # [N, H, W] uint8, [N] int64
    if not 1 <= args.n <= len(labels):
        raise ValueError(f"--n must be between 1 and {len(labels)} (the size of {args.dataset} {args.split})")
    for index in sorted(balanced_indices(labels, args.n, np.random.default_rng(args.seed)).tolist()):
        label = int(labels[index])
        meta = {
            "label": label,
            "class": source.classes[label],
            "dataset": args.dataset,
            "split": args.split,
            "index": index,
        }
        key = f"{source.key_prefix}_{args.split}_{index:06d}"
        yield Item(key, png_bytes(Image.fromarray(images[index])), "png", source.caption(label), meta)


TASKS: dict[str, Callable[[argparse.Namespace], Iterator[Item]]] = {"class": class_items}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--dataset", default="fashion-mnist", help="source for --task class")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        count = write_folder(TASKS[args.task](args), args.out, args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {count} {args.task} samples from {args.dataset} {args.split} (seed {args.seed}) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
