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
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from selfflow.data.avio import audio_duration, decode_audio, decode_av, probe
from selfflow.data.decode import FITS, LIMITS, DecodeLimits, open_image, to_channels
from selfflow.data.fields import (
    AUDIO_CONTAINERS,
    TASK_FIELDS,
    TASK_MODALITIES,
    VIDEO_CONTAINERS,
    caption_of,
    infer_task,
    media_field,
)
from selfflow.data.latents import read_latent
from selfflow.data.shards import is_url, iter_tar_samples, shard_error
from selfflow.tokenizers.spec import ClipSpec

CLIP_WINDOWS = ("random", "start")
_KEEP = 10_000  # skipped samples remembered by key per stream (all are counted)


class DataError(ValueError):
    """A sample or shard that cannot be used (raised only in strict mode, else counted and skipped)."""


@dataclass
class Sample:
    key: str
    media: dict[str, np.ndarray]  # per modality, float32, channels first
    caption: str


def decode_sample(
    raw: dict,
    task: str,
    spec: ClipSpec,
    image_fit: str = "crop",
    limits: DecodeLimits = LIMITS,
    caption_key: str = "caption",
    rng: np.random.Generator | None = None,
    latents: frozenset[str] = frozenset(),
) -> Sample:
    """A raw tar sample {"__key__", field: bytes} -> Sample; DataError naming the problem, whatever
    failed (MemoryError and unexpected decoder errors included). Images meet the spec's size by
    `image_fit`: "crop" (cover, cut the centre) or "pad" (fit inside, extend the border). A clip longer
    than the spec's duration gives a window at a start drawn from `rng` (its first seconds without).
    The modalities in `latents` are the sample's stored codec latents (`data/latents.py`), not decoded."""
    try:
        return _decode(raw, task, spec, image_fit, limits, caption_key, rng, latents)
    except DataError:
        raise
    except ValueError as err:
        raise DataError(str(err)) from err
    except Exception as err:  # MemoryError, or a decoder failing in a way it does not document
        raise DataError(f"{type(err).__name__}: {err}") from err


def _window_start(duration: float, spec: ClipSpec, rng: np.random.Generator | None) -> float:
    """Where the clip starts in a source of `duration` seconds: 0, or uniform over the starts whose
    window the source covers (a frame's margin for rounding in the header's duration)."""
    room = duration - spec.duration - 1.0 / spec.fps
    return float(rng.uniform(0.0, room)) if rng is not None and room > 0 else 0.0


def _decode(
    raw: dict,
    task: str,
    spec: ClipSpec,
    image_fit: str,
    limits: DecodeLimits,
    caption_key: str,
    rng: np.random.Generator | None,
    latents: frozenset[str],
) -> Sample:
    key = str(raw["__key__"])
    if "__error__" in raw:
        raise DataError(str(raw["__error__"]))
    caption = caption_of(raw, caption_key)
    stored = {m: read_latent(raw, m, spec) for m in TASK_MODALITIES[task] if m in latents}
    if len(stored) == len(TASK_MODALITIES[task]):  # nothing left to decode
        return Sample(key, stored, caption)
    if stored:  # stored latents cover the clip's first window: the decoded part must match them
        rng = None
    name = media_field(raw, task)
    if name is None:
        raise DataError(f"no {'/'.join(TASK_FIELDS[task])} field")
    data = raw[name]
    if task == "image":
        img = to_channels(open_image(data, limits), spec.video_channels)
        pixels = np.asarray(FITS[image_fit](img, spec.image_height, spec.image_width), np.float32)
        media = {"image": pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1) / 127.5 - 1}
    elif task == "audio":
        box = AUDIO_CONTAINERS[name]
        start = _window_start(audio_duration(data, limits, box), spec, rng) if rng is not None else 0.0
        media = {"audio": decode_audio(data, spec, start, limits, box)}
    else:
        box = VIDEO_CONTAINERS[name]
        start = _window_start(probe(data, limits, box).duration, spec, rng) if rng is not None else 0.0
        video, audio = "video" not in stored, task == "av" and "audio" not in stored
        clip = decode_av(data, spec, start, video=video, audio=audio, limits=limits, container=box)
        media = {} if clip.video is None else {"video": clip.video.astype(np.float32).transpose(3, 0, 1, 2)}
        media = {m: x / 127.5 - 1 for m, x in media.items()}  # [C, T, H, W] in [-1, 1]
        if clip.audio is not None:
            media["audio"] = clip.audio
    return Sample(key, {**media, **stored}, caption)


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
    caption_key: str = "caption"  # the json entry read when a sample has no txt / caption field
    clip_window: str = "random"  # where a longer clip is cut: "random" (seeded by the position) | "start"
    mixed: frozenset[str] = frozenset()  # shards whose samples are routed by their fields (infer_task)
    accounting: bool = True  # counts faults of the mixed shards (one stream of those that share them)
    open_retries: int = 3  # a URL shard that fails is opened again this often, then skipped
    retry_wait_s: float = 1.0  # before the first retry; doubled each time
    latents: frozenset[str] = frozenset()  # modalities read from stored codec latents (data/latents.py)
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
        for shard in shards:
            yield from ((shard, raw) for raw in self._shard_samples(shard))

    def _shard_samples(self, shard: str) -> Iterator[dict]:
        """One shard's samples. A URL that fails (a command's exit status, a dropped connection) is
        opened again up to `open_retries` times, passing over the samples already given; then, like a
        damaged local file, it is one counted fault and the rest of the shard is skipped."""
        given, attempt, max_bytes = 0, 0, int(self.limits.max_field_mb * 1e6)
        while True:
            try:
                for i, raw in enumerate(iter_tar_samples(shard, max_bytes)):
                    if i >= given:
                        given += 1
                        yield raw
                return
            except (tarfile.TarError, OSError) as err:
                if is_url(shard) and attempt < self.open_retries:
                    time.sleep(self.retry_wait_s * 2**attempt)
                    attempt += 1
                    continue
                tries = f" (after {attempt + 1} attempts)" if is_url(shard) else ""
                why = f"unreadable shard from here on{tries}: {shard_error(err)}"
                self._fault(f"{shard}:*", why, shared_in=shard)
                return

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

    def _fault(self, where: str, reason: str, shared_in: str | None = None) -> None:
        """Count a bad sample or shard. A fault `shared_in` a mixed shard (the shard itself, or a sample
        whose task cannot be told) is met by every stream reading it: only the accounting one counts it."""
        if shared_in in self.mixed and not self.accounting:
            return
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
        fresh = self.position == 0  # this call reads an epoch from its start: it must find a sample
        while True:
            raw = next(self._raw, None)
            if raw is None:  # end of the epoch
                if fresh:
                    raise DataError(
                        f"{self.task}: a whole epoch of this process's {len(self._my_shards(self.epoch))} "
                        f"shard(s) without a good {self.task} sample ({self.skipped_count} skipped)"
                    )
                self.epoch, self.position, fresh = self.epoch + 1, 0, True
                self._raw = self._epoch_stream(skip=0)
                continue
            self.position += 1
            where = f"{raw['__shard__']}:{raw['__key__']}"
            if raw["__shard__"] in self.mixed:
                try:
                    if infer_task(raw, self.limits) != self.task:
                        continue  # another task's sample
                except Exception as err:  # no known media field, a container that will not open, ...
                    self._fault(where, shard_error(err), shared_in=raw["__shard__"])
                    continue
            try:
                return decode_sample(
                    raw, self.task, self.spec, self.image_fit, self.limits, self.caption_key, self._rng(),
                    self.latents,
                )  # fmt: skip
            except DataError as err:
                self._fault(where, str(err))

    def _rng(self) -> np.random.Generator | None:
        """The generator of this sample's clip window: a function of the position, so a resumed run
        cuts the same windows."""
        if self.clip_window != "random" or self.task == "image":
            return None
        salt = zlib.crc32(self.task.encode())
        return np.random.default_rng([self.seed, self.rank, self.worker, self.epoch, salt, self.position])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped_count": self.skipped_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped_count = int(state.get("skipped_count", 0))
        self._raw = self._epoch_stream(skip=self.position)
