"""The training data pipeline: one stream per task from its shard set, mixed by weight, one task per
batch, deterministic, fault-tolerant, and resumable to the exact next sample.

    pipe = DataPipeline("shards/", spec, seed=0, weights={"image": 1, "av": 3}, batch_sizes={"av": 8})
    batch = next(pipe)           # MediaBatch(task="av", media={"video": [8,3,T,H,W], "audio": [8,1,N]}, ...)
    state = pipe.state_dict()    # JSON-able; DataPipeline(...).load_state_dict(state) continues exactly

Tasks and fields (the shard sets `tools/make_shards.py` writes): `image` (png / jpg / webp),
`video` (mp4), `audio` (flac / wav), `av` (mp4 with an audio track); every sample has `txt`. Media come
out as float32 in [-1, 1]: image [C, H, W], video [C, T, H, W], audio [C, N], shaped by the clip spec
(`data/avio.py` aligns video and audio on the container clock; a clip is the first `spec.duration`
seconds of the sample, which make_shards cuts to length).

Order. Each epoch of a task permutes its shard list with RNG (seed, epoch), the same on every rank,
and gives process (rank, worker) every (world x workers)-th shard of it, so processes read disjoint
shards; samples then pass a shuffle buffer seeded by (seed, rank, worker, epoch, task). Which task a
batch comes from is drawn from RNG (seed, rank, batch index). The state is the batch index plus, per
task, (epoch, raw samples consumed in the epoch): restoring replays the raw tar stream up to that
point without decoding, so the next batch is the one an uninterrupted run would have produced.

Faults. A sample that fails to decode or lacks its media or caption is skipped and counted with its key
and shard (`skipped`), never half-yielded; an unreadable or truncated shard is skipped from the damage
on. `strict=True` raises instead. More processes than shards is an error at start.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfflow.data.avio import decode_audio, decode_av
from selfflow.data.decode import FITS, IMAGE_FIELDS, open_image, to_channels
from selfflow.data.loader import resolve_shards, split_sources
from selfflow.data.shards import iter_tar_samples
from selfflow.tokenizers.spec import ClipSpec

TASK_MODALITIES = {"image": ("image",), "video": ("video",), "audio": ("audio",), "av": ("video", "audio")}
TASK_FIELDS = {"image": IMAGE_FIELDS, "video": ("mp4",), "audio": ("flac", "wav"), "av": ("mp4",)}


class DataError(ValueError):
    """A sample or shard that cannot be used (raised only in strict mode, else counted and skipped)."""


@dataclass
class MediaBatch:
    task: str
    media: dict[str, Tensor]  # image [B, C, H, W], video [B, C, T, H, W], audio [B, C, N]; float32 in [-1, 1]
    captions: list[str]
    keys: list[str]


@dataclass
class Sample:
    key: str
    media: dict[str, np.ndarray]  # per modality, float32, channels first
    caption: str


def decode_sample(raw: dict, task: str, spec: ClipSpec, image_fit: str = "crop") -> Sample:
    """A raw tar sample {"__key__", field: bytes} -> Sample; DataError naming the problem.
    Images meet the spec's size by `image_fit`: "crop" (cover, cut the centre) or "pad" (fit inside,
    extend the border)."""
    key = str(raw["__key__"])
    field_name = next((f for f in TASK_FIELDS[task] if f in raw), None)
    if field_name is None:
        raise DataError(f"no {'/'.join(TASK_FIELDS[task])} field")
    caption = raw.get("txt", b"")
    try:
        caption = caption.decode("utf-8").strip() if isinstance(caption, bytes) else str(caption).strip()
    except UnicodeDecodeError as err:
        raise DataError("caption is not UTF-8") from err
    if not caption:
        raise DataError("missing or empty caption")
    data = raw[field_name]
    try:
        if task == "image":
            img = to_channels(open_image(data), spec.video_channels)
            pixels = np.asarray(FITS[image_fit](img, spec.image_height, spec.image_width), np.float32)
            media = {"image": pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1) / 127.5 - 1}
        elif task == "audio":
            media = {"audio": decode_audio(data, spec)}
        else:
            clip = decode_av(data, spec, video=True, audio=task == "av")
            media = {"video": clip.video.astype(np.float32).transpose(3, 0, 1, 2) / 127.5 - 1}  # [C, T, H, W]
            if clip.audio is not None:
                media["audio"] = clip.audio
    except ValueError as err:
        raise DataError(str(err)) from err
    return Sample(key, media, caption)


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Buffer shuffle: each arriving sample swaps with a random buffered one, which leaves."""
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


@dataclass
class TaskStream:
    """One task's shards for one process (rank, worker): an endless, resumable sample iterator."""

    task: str
    shards: list[str]
    spec: ClipSpec
    seed: int = 0
    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1
    shuffle_buffer: int = 256
    strict: bool = False
    image_fit: str = "crop"
    epoch: int = 0
    position: int = 0  # raw samples consumed in this epoch, bad ones included
    skipped: dict[str, str] = field(default_factory=dict)  # "shard:key" -> reason
    skipped_count: int = 0

    def __post_init__(self) -> None:
        parts = self.world * self.workers
        if len(self.shards) < parts:
            raise ValueError(
                f"{self.task}: {len(self.shards)} shard(s) for {self.world} rank(s) x {self.workers} "
                f"worker(s); every process needs a shard (make smaller shards: make_shards --shard-samples)"
            )
        self._raw = self._epoch_stream(skip=self.position)

    def _my_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        mine = order[self.rank * self.workers + self.worker :: self.world * self.workers]
        return [self.shards[i] for i in mine]

    def _tar_samples(self, shards: list[str]) -> Iterator[tuple[str, dict]]:
        for shard in shards:
            try:
                for raw in iter_tar_samples(shard):
                    yield shard, raw
            except (tarfile.TarError, OSError) as err:
                self._fault(f"{shard}:*", f"unreadable shard from here on: {err}")

    def _epoch_stream(self, skip: int) -> Iterator[tuple[str, dict]]:
        salt = zlib.crc32(self.task.encode())
        rng = np.random.default_rng([self.seed, self.rank, self.worker, self.epoch, salt])
        tagged = ({"__shard__": s, **raw} for s, raw in self._tar_samples(self._my_shards(self.epoch)))
        stream = _shuffled(tagged, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else tagged
        for _ in range(skip):  # replay to the saved position without decoding
            if next(stream, None) is None:
                break
        return stream

    def _fault(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}")
        self.skipped[where] = reason
        self.skipped_count += 1

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> Sample:
        good = 0  # good samples since this call began reading an epoch from its start
        fresh = self.position == 0
        while True:
            raw = next(self._raw, None)
            if raw is None:  # end of the epoch
                if fresh and good == 0:
                    raise DataError(
                        f"{self.task}: a whole epoch without a good sample ({self.skipped_count} skipped)"
                    )
                self.epoch, self.position, fresh = self.epoch + 1, 0, True
                self._raw = self._epoch_stream(skip=0)
                continue
            self.position += 1
            try:
                return decode_sample(raw, self.task, self.spec, self.image_fit)
            except DataError as err:
                self._fault(f"{raw['__shard__']}:{raw['__key__']}", str(err))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped_count": self.skipped_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped_count = int(state.get("skipped_count", 0))
        self._raw = self._epoch_stream(skip=self.position)


def available_tasks(shards: str | Path) -> list[str]:
    """Tasks with a shard set in any of the make_shards output folders `shards` names (comma-separated;
    a folder's manifest counts, else its file prefixes)."""
    found = set()
    for source in split_sources(shards):
        folder = Path(source)
        manifest = folder / "manifest.json"
        if manifest.is_file():
            counts = json.loads(manifest.read_text()).get("counts", {})
            found.update(t for t in TASK_MODALITIES if counts.get(t, 0) > 0)
        else:
            found.update(t for t in TASK_MODALITIES if any(folder.glob(f"{t}-*.tar")))
    return [t for t in TASK_MODALITIES if t in found]


def _task_shards(shards: str | Path, task: str) -> list[str]:
    """The task's shards from every source that has some."""
    sources = [s for s in split_sources(shards) if task in available_tasks(s)]
    return [path for source in sources for path in resolve_shards(source, task)]


class DataPipeline:
    """Per-task streams mixed by weight; each batch holds one task with that task's batch size.
    `shards` may name several make_shards folders, comma-separated: a task reads all of their shards."""

    def __init__(
        self,
        shards: str | Path,
        spec: ClipSpec,
        seed: int = 0,
        weights: dict[str, float] | None = None,
        batch_sizes: dict[str, int] | None = None,
        batch_size: int = 32,
        *,
        rank: int = 0,
        world: int = 1,
        worker: int = 0,
        workers: int = 1,
        shuffle_buffer: int = 256,
        strict: bool = False,
        image_fit: str = "crop",
    ) -> None:
        if image_fit not in FITS:
            raise ValueError(f"image_fit must be one of {', '.join(FITS)}, got {image_fit!r}")
        found = available_tasks(shards)
        weights = dict(weights) if weights else {t: 1.0 for t in found}
        missing = [t for t in weights if t not in found]
        if missing or not weights:
            raise FileNotFoundError(
                f"no shard set for task(s) {missing or list(TASK_MODALITIES)} in {shards}"
            )
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")
        self.tasks = [t for t in TASK_MODALITIES if weights.get(t, 0) > 0]
        self.probs = np.array([weights[t] for t in self.tasks], np.float64) / sum(
            weights[t] for t in self.tasks
        )
        self.batch_sizes = {t: int((batch_sizes or {}).get(t, batch_size)) for t in self.tasks}
        self.seed, self.rank, self.worker, self.batches = seed, rank, worker, 0
        proc = {"rank": rank, "world": world, "worker": worker, "workers": workers, "image_fit": image_fit}
        self.streams = {
            t: TaskStream(
                t, _task_shards(shards, t), spec, seed, shuffle_buffer=shuffle_buffer, strict=strict, **proc
            )
            for t in self.tasks
        }

    def __iter__(self) -> DataPipeline:
        return self

    def next_task(self) -> str:
        rng = np.random.default_rng([self.seed, self.rank, self.worker, self.batches])
        return self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]

    def __next__(self) -> MediaBatch:
        task = self.next_task()
        stream = self.streams[task]
        samples = [next(stream) for _ in range(self.batch_sizes[task])]
        self.batches += 1
        media = {m: torch.from_numpy(np.stack([s.media[m] for s in samples])) for m in TASK_MODALITIES[task]}
        return MediaBatch(task, media, [s.caption for s in samples], [s.key for s in samples])

    @property
    def skipped_count(self) -> int:
        return sum(s.skipped_count for s in self.streams.values())

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: batches drawn and each stream's (epoch, raw position)."""
        return {"batches": self.batches, "streams": {t: s.state_dict() for t, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["streams"]) != set(self.streams):
            raise ValueError(
                f"data state has tasks {sorted(state['streams'])}, the pipeline {sorted(self.streams)}"
            )
        self.batches = int(state["batches"])
        for t, s in state["streams"].items():
            self.streams[t].load_state_dict(s)


class _WorkerStream(torch.utils.data.IterableDataset):
    """Inside DataLoader worker i: the DataPipeline of logical worker (first + i) % workers, yielding
    (batch, its state after the batch)."""

    def __init__(self, kwargs: dict[str, Any], workers: int, first: int, states: list | None) -> None:
        super().__init__()
        self.kwargs, self.workers, self.first, self.states = kwargs, workers, first, states

    def __iter__(self) -> Iterator[tuple[MediaBatch, dict]]:
        info = torch.utils.data.get_worker_info()
        logical = (self.first + (info.id if info is not None else 0)) % self.workers
        pipe = DataPipeline(**self.kwargs, worker=logical, workers=self.workers)
        if self.states is not None and self.states[logical] is not None:
            pipe.load_state_dict(self.states[logical])
        for batch in pipe:
            yield batch, pipe.state_dict()


class WorkerPipeline:
    """DataPipeline split over `workers` DataLoader processes (each reads its own shards), in a fixed
    round-robin order, with a state that restores the exact next batch (worker w's own state plus
    which worker is next).

        pipe = WorkerPipeline(dict(shards="shards/", spec=spec, seed=0), workers=2)
    """

    def __init__(self, kwargs: dict[str, Any], workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.kwargs, self.workers = kwargs, workers
        DataPipeline(**kwargs, worker=workers - 1, workers=workers)  # fail now on too few shards / bad tasks
        self.states: list[dict | None] = [None] * workers
        self.count = 0  # batches delivered
        self._loader: Iterator | None = None
        self.skipped_count = 0

    def _start(self) -> Iterator:
        first = self.count % self.workers
        dataset = _WorkerStream(self.kwargs, self.workers, first, self.states)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.workers, persistent_workers=False, prefetch_factor=2
        )
        return iter(loader)

    def __iter__(self) -> WorkerPipeline:
        return self

    def __next__(self) -> MediaBatch:
        if self._loader is None:
            self._loader = self._start()
        batch, state = next(self._loader)
        self.states[self.count % self.workers] = state
        self.count += 1
        self.skipped_count = sum(
            t["skipped_count"] for st in self.states if st is not None for t in st["streams"].values()
        )
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "count": self.count, "states": list(self.states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["workers"]) != self.workers:
            raise ValueError(f"data state is for {state['workers']} workers, this run has {self.workers}")
        self.count, self.states, self._loader = int(state["count"]), list(state["states"]), None
