"""The training-side reader of image shards: endless, deterministic, fault-tolerant batches.

    reader = image_batches("shards/", spec, batch_size=32, seed=0)
    batch = next(reader)  # ImageBatch: pixels [32, 3, H, W] in [-1, 1], captions, keys, epoch

Order. Epoch e draws from a numpy generator seeded with (seed, e): it permutes the shard list, then
streams the samples through a shuffle buffer of `shuffle_buffer` samples (drained at the end of the
epoch). The same seed and epoch give the same batches, bit for bit; another epoch gives another
order. The last partial batch of an epoch is dropped, so every batch is full and belongs to exactly
one epoch (resume by passing `start_epoch`).

Faults. A sample whose image does not decode or whose caption is missing or empty is skipped and
recorded in `reader.skipped` (key -> reason); so is an unreadable shard (path -> reason), after
the samples before the damage. Nothing in the data stops training, unless an epoch ends up with fewer
than `batch_size` good samples, which would otherwise loop forever without a batch.

Single process (no workers): decoding small images costs a few tens of microseconds each. Video and
audio readers will sit next to this one, sharing `resolve_shards` and the shuffling.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from webdataset.shardlists import expand_urls

from selfflow.data.decode import IMAGE_FIELDS, open_image, resize_center_crop, to_channels
from selfflow.data.shards import iter_tar_samples
from selfflow.tokenizers.spec import ClipSpec

MANIFEST = "manifest.json"
ShardSource = str | Path | list[str | Path] | tuple[str | Path, ...]


@dataclass
class ImageBatch:
    pixels: Tensor  # [B, C, H, W] float32 in [-1, 1]
    captions: list[str]
    keys: list[str]
    epoch: int


def _manifest_shards(folder: Path, task: str) -> list[str] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return [str(folder / shard["file"]) for shard in manifest.get("shards", {}).get(task, [])]


def resolve_shards(shards: ShardSource, task: str = "image") -> list[str]:
    """Shard paths from a folder (its manifest, else `<task>-*.tar`), a glob, a brace pattern
    (`a-{000000..000009}.tar`), one file, or a list of any of these."""
    if isinstance(shards, (list, tuple)):
        paths = [p for item in shards for p in resolve_shards(item, task)]
    else:
        text = str(shards)
        if Path(text).is_dir():
            found = _manifest_shards(Path(text), task)
            paths = found if found is not None else sorted(glob.glob(str(Path(text) / f"{task}-*.tar")))
        elif any(c in text for c in "*?["):
            paths = sorted(glob.glob(text))
        else:
            paths = expand_urls(text)
        if not paths:
            raise FileNotFoundError(f"no {task} shards found at {text}")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"shard {path} not found")
    return paths


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Approximate shuffle with a buffer of `size`: each arriving sample replaces a random one that leaves."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _caption(sample: dict) -> str:
    if "txt" not in sample:
        raise ValueError("missing caption")
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError("caption is not UTF-8") from err
    if not caption:
        raise ValueError("empty caption")
    return caption


class ImageReader:
    """An endless iterator of ImageBatch; see the module docstring for order and fault handling."""

    def __init__(
        self,
        shards: ShardSource,
        spec: ClipSpec,
        batch_size: int,
        seed: int,
        *,
        start_epoch: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0 or start_epoch < 0 or shuffle_buffer < 0:
            raise ValueError("seed, start_epoch and shuffle_buffer must be non-negative")
        self.shards = resolve_shards(shards, "image")
        self.spec, self.batch_size, self.seed = spec, batch_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = start_epoch  # the epoch being read now
        self.skipped: dict[str, str] = {}  # sample key (or shard path) -> why it was skipped
        self.skipped_count = 0  # skip events, counting a bad sample again in every epoch
        self._batches = self._generate()

    def __iter__(self) -> ImageReader:
        return self

    def __next__(self) -> ImageBatch:
        return next(self._batches)

    def _skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        self.skipped_count += 1

    def _raw_samples(self, order: list[str]) -> Iterator[dict]:
        for shard in order:
            try:
                yield from iter_tar_samples(shard)
            except (tarfile.TarError, OSError) as err:
                self._skip(shard, f"unreadable shard: {err}")

    def _decode(self, sample: dict) -> tuple[np.ndarray, str] | None:
        """[H, W, C] uint8 pixels and the caption, or None (recorded in `skipped`)."""
        try:
            field = next((f for f in IMAGE_FIELDS if f in sample), None)
            if field is None:
                raise ValueError("no image field")
            caption = _caption(sample)
            img = to_channels(open_image(sample[field]), self.spec.video_channels)
        except ValueError as err:
            self._skip(str(sample["__key__"]), str(err))
            return None
        pixels = np.asarray(resize_center_crop(img, self.spec.image_height, self.spec.image_width))
        return pixels.reshape(pixels.shape[0], pixels.shape[1], -1), caption  # grey [H, W] -> [H, W, 1]

    def _batch(self, items: list[tuple[str, np.ndarray, str]], epoch: int) -> ImageBatch:
        stacked = np.stack([pixels for _, pixels, _ in items]).transpose(0, 3, 1, 2)  # [B, C, H, W] uint8
        # numpy, not torch: torch's thread pool stalls on small ops while training keeps the cores busy
        pixels = np.ascontiguousarray(stacked, dtype=np.float32) / np.float32(127.5) - np.float32(1)
        return ImageBatch(torch.from_numpy(pixels), [c for _, _, c in items], [k for k, _, _ in items], epoch)

    def _generate(self) -> Iterator[ImageBatch]:
        while True:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = [self.shards[i] for i in rng.permutation(len(self.shards))]
            items: list[tuple[str, np.ndarray, str]] = []
            batches = 0
            for sample in _shuffled(self._raw_samples(order), self.shuffle_buffer, rng):
                decoded = self._decode(sample)
                if decoded is None:
                    continue
                items.append((str(sample["__key__"]), *decoded))
                if len(items) == self.batch_size:
                    yield self._batch(items, self.epoch)
                    items, batches = [], batches + 1
            if batches == 0:
                raise ValueError(
                    f"epoch {self.epoch} has only {len(items)} good samples, fewer than batch_size "
                    f"{self.batch_size} ({len(self.skipped)} skipped; see .skipped)"
                )
            self.epoch += 1


def image_batches(
    shards: ShardSource,
    spec: ClipSpec,
    batch_size: int,
    seed: int,
    *,
    start_epoch: int = 0,
    shuffle_buffer: int = 1000,
) -> ImageReader:
    """Endless ImageBatch iterator over image shards; the returned reader exposes `.skipped`."""
    return ImageReader(shards, spec, batch_size, seed, start_epoch=start_epoch, shuffle_buffer=shuffle_buffer)


def describe_shards(path: str | Path) -> dict:
    """What a shard folder holds: its manifest if present, else the tar files found by task prefix."""
    path = Path(path)
    folder = path.parent if path.name == MANIFEST else path
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} not found")
    if (folder / MANIFEST).is_file():
        return {"path": str(folder), "manifest": True, **json.loads((folder / MANIFEST).read_text())}
    shards: dict[str, list[dict]] = {}
    for tar in sorted(folder.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        task = tar.name.rsplit("-", 1)[0]
        shards.setdefault(task, []).append({"file": tar.name, "bytes": tar.stat().st_size})
    return {"path": str(folder), "manifest": False, "shards": shards}
