"""One task's samples for one process: decoding a raw tar sample (`decode_sample`) and the endless,
resumable, fault-counting stream over a shard list (`TaskStream`). `data/pipeline.py` mixes streams.

Faults. A sample that fails to decode in any way (a decoder error, a format or size outside
`data.limits`, running out of memory) or lacks its media or caption is skipped and counted with its
key and shard (`skipped`, and until the next batch in `recent`), never half-yielded; an unreadable or
truncated shard (a cut inside a header included) is skipped from the damage on. Faults met again while
a resumed stream replays to its position are not counted twice. `strict=True` raises instead.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from selfflow.data.avio import decode_audio, decode_av
from selfflow.data.decode import FITS, IMAGE_FIELDS, LIMITS, DecodeLimits, open_image, to_channels
from selfflow.data.shards import iter_tar_samples
from selfflow.tokenizers.spec import ClipSpec

TASK_MODALITIES = {"image": ("image",), "video": ("video",), "audio": ("audio",), "av": ("video", "audio")}
TASK_FIELDS = {"image": IMAGE_FIELDS, "video": ("mp4",), "audio": ("flac", "wav"), "av": ("mp4",)}
_KEEP = 10_000  # skipped samples remembered by key per stream (all are counted)


class DataError(ValueError):
    """A sample or shard that cannot be used (raised only in strict mode, else counted and skipped)."""


@dataclass
class Sample:
    key: str
    media: dict[str, np.ndarray]  # per modality, float32, channels first
    caption: str


def decode_sample(
    raw: dict, task: str, spec: ClipSpec, image_fit: str = "crop", limits: DecodeLimits = LIMITS
) -> Sample:
    """A raw tar sample {"__key__", field: bytes} -> Sample; DataError naming the problem, whatever
    failed (MemoryError and unexpected decoder errors included). Images meet the spec's size by
    `image_fit`: "crop" (cover, cut the centre) or "pad" (fit inside, extend the border)."""
    try:
        return _decode(raw, task, spec, image_fit, limits)
    except DataError:
        raise
    except ValueError as err:
        raise DataError(str(err)) from err
    except Exception as err:  # MemoryError, or a decoder failing in a way it does not document
        raise DataError(f"{type(err).__name__}: {err}") from err


def _decode(raw: dict, task: str, spec: ClipSpec, image_fit: str, limits: DecodeLimits) -> Sample:
    key = str(raw["__key__"])
    if "__error__" in raw:
        raise DataError(str(raw["__error__"]))
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
    if task == "image":
        img = to_channels(open_image(data, limits), spec.video_channels)
        pixels = np.asarray(FITS[image_fit](img, spec.image_height, spec.image_width), np.float32)
        media = {"image": pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1) / 127.5 - 1}
    elif task == "audio":
        media = {"audio": decode_audio(data, spec, limits=limits)}
    else:
        clip = decode_av(data, spec, video=True, audio=task == "av", limits=limits)
        media = {"video": clip.video.astype(np.float32).transpose(3, 0, 1, 2) / 127.5 - 1}  # [C, T, H, W]
        if clip.audio is not None:
            media["audio"] = clip.audio
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
    limits: DecodeLimits = LIMITS
    epoch: int = 0
    position: int = 0  # raw samples consumed in this epoch, bad ones included
    skipped: dict[str, str] = field(default_factory=dict)  # "shard:key" -> reason (the latest _KEEP)
    skipped_count: int = 0
    recent: list[tuple[str, str]] = field(default_factory=list)  # faults not yet reported in a batch

    def __post_init__(self) -> None:
        parts = self.world * self.workers
        if len(self.shards) < parts:
            raise DataError(
                f"{self.task}: {len(self.shards)} shard(s) for {self.world} rank(s) x {self.workers} "
                f"worker(s); every process needs a shard (make smaller shards: make_shards --shard-samples)"
            )
        self._replaying = False
        self._raw = self._epoch_stream(skip=self.position)

    def _my_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        mine = order[self.rank * self.workers + self.worker :: self.world * self.workers]
        return [self.shards[i] for i in mine]

    def _tar_samples(self, shards: list[str]) -> Iterator[tuple[str, dict]]:
        max_bytes = int(self.limits.max_field_mb * 1e6)
        for shard in shards:
            try:
                for raw in iter_tar_samples(shard, max_bytes):
                    yield shard, raw
            except (tarfile.TarError, OSError) as err:
                self._fault(f"{shard}:*", f"unreadable shard from here on: {err}")

    def _epoch_stream(self, skip: int) -> Iterator[tuple[str, dict]]:
        salt = zlib.crc32(self.task.encode())
        rng = np.random.default_rng([self.seed, self.rank, self.worker, self.epoch, salt])
        tagged = ({"__shard__": s, **raw} for s, raw in self._tar_samples(self._my_shards(self.epoch)))
        stream = _shuffled(tagged, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else tagged
        self._replaying = True  # shard faults met here were counted before the state was saved
        try:
            for _ in range(skip):  # replay to the saved position without decoding
                if next(stream, None) is None:
                    break
        finally:
            self._replaying = False
        return stream

    def _fault(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}")
        if self._replaying:
            return
        if len(self.skipped) >= _KEEP:  # a long run over a bad corpus must not grow without bound
            self.skipped.pop(next(iter(self.skipped)))
        self.skipped[where] = reason
        self.skipped_count += 1
        self.recent.append((where, reason))

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
                return decode_sample(raw, self.task, self.spec, self.image_fit, self.limits)
            except DataError as err:
                self._fault(f"{raw['__shard__']}:{raw['__key__']}", str(err))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped_count": self.skipped_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped_count = int(state.get("skipped_count", 0))
        self._raw = self._epoch_stream(skip=self.position)
