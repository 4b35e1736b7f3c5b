"""T2I-class: one packaged image per sample, captioned by its class ("a photo of an ankle boot").

Images are drawn evenly over the classes; the json holds the label, class name, split and index.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from selfflow.data.benchmark.common import Item, Task, check_n
from selfflow.data.decode import png_bytes
from selfflow.data.packaged import FASHION_MNIST_CLASSES, fashion_mnist_caption, load_fashion_mnist


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
    """Samples of --dataset/--split, balanced over the classes."""
    if args.dataset not in CLASS_DATASETS:
        raise ValueError(
            f"task 'class' has no dataset {args.dataset!r}; choose from {sorted(CLASS_DATASETS)}"
        )
    source = CLASS_DATASETS[args.dataset]
    images, labels = source.load(args.split)  # [N, H, W] uint8, [N] int64
    check_n(args.n, len(labels))
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


TASK = Task(
    class_items,
    "packaged class images captioned by class (--dataset, --split)",
    {"tiny": {"n": 500}, "full": {"n": 10_000}},
)
