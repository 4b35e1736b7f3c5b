"""One input file -> its shard samples: decode and check everything, then store or re-encode.

    outcome = prepare(entry, Target(fps=8, duration=1.0, video_size=(32, 32)))
    outcome.task, [s.fields.keys() for s in outcome.samples]   # "av", [{"mp4", "txt", "json"}, ...]

Tasks: `image` (png / jpg / webp), `video` (an mp4 without an audio track, or any mp4 under
`no_audio`), `av` (an mp4 with video and audio), `audio` (wav / flac, stored as flac).

Without a target for the task, the original bytes are stored once every frame and audio sample has
decoded (a wav becomes a lossless flac; `no_audio` remuxes an mp4 without its audio track). With one,
media are re-encoded to it: images to PNG at `image_size`, video and av through `data.avio` to H.264
(+ AAC) at `video_size` / `fps` / `sample_rate`, audio to 16-bit flac. `duration` cuts an input into
consecutive clips `<key>_c000`, `<key>_c001`, ... of that length (the remainder is dropped, an input
shorter than one clip is rejected); fields the target leaves open keep the source's values.

A sample's bytes depend only on the input and the target, as far as the encoders are deterministic
(PNG, flac and the tar layout are; H.264 is as deterministic as `data.avio.encode_mp4`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
import soundfile

from selfflow.data.avio import (
    AV_ERRORS,
    MediaInfo,
    check_audio_format,
    decode_audio,
    decode_av,
    encode_mp4,
    probe,
    read_audio,
)
from selfflow.data.decode import (
    IMAGE_FIELD_OF_FORMAT,
    LIMITS,
    DecodeLimits,
    normalize_mode,
    open_image,
    png_bytes,
    resize_center_crop,
)
from selfflow.data.fields import AUDIO_CONTAINERS, VIDEO_CONTAINERS
from selfflow.data.inputs import Entry
from selfflow.data.latents import LatentOptions, latent_fields
from selfflow.tokenizers.spec import ClipSpec

TASKS = ("image", "video", "audio", "av")
TASK_FIELDS = {"image": ("png", "jpg", "webp"), "video": ("mp4", "webm", "mkv"), "audio": ("flac",)}
TASK_FIELDS["av"] = TASK_FIELDS["video"]
DECODE_ERRORS = (*AV_ERRORS, RuntimeError)  # RuntimeError: soundfile's LibsndfileError
_CHECK_SIZE = 4  # frames are scaled to this many pixels when only checking that they decode
_GROUP_BYTES = 256 << 20  # decoded media held at once when cutting clips
_FLAC_SUBTYPE = {"PCM_S8": "PCM_S8", "PCM_U8": "PCM_S8", "PCM_16": "PCM_16", "PCM_24": "PCM_24"}


@dataclass(frozen=True)
class Target:
    """What samples are re-encoded to; None keeps the source's value (and the original bytes when
    nothing applies to the task)."""

    image_size: tuple[int, int] | None = None  # (height, width)
    video_size: tuple[int, int] | None = None
    fps: float | None = None
    duration: float | None = None  # seconds per clip
    sample_rate: int | None = None
    audio_channels: int | None = None
    no_audio: bool = False  # mp4 audio tracks are dropped: every mp4 is a `video` sample

    def reencodes(self, task: str) -> bool:
        video = (self.video_size, self.fps, self.duration)
        audio = (self.duration, self.sample_rate, self.audio_channels)
        wanted = {"image": (self.image_size,), "video": video, "audio": audio, "av": video + audio}[task]
        return any(value is not None for value in wanted)


@dataclass
class Prepared:
    key: str
    fields: dict[str, bytes | str]  # shard fields: media, "txt", "json"
    stats: dict[str, str | float | int] = field(default_factory=dict)  # resolution, duration, sample_rate


@dataclass
class Outcome:
    """What became of one entry: the samples of one task, or the reason it was rejected."""

    key: str
    path: str
    task: str | None = None
    samples: list[Prepared] = field(default_factory=list)
    reason: str | None = None


def prepare(
    entry: Entry, target: Target, latents: LatentOptions | None = None, limits: DecodeLimits = LIMITS
) -> Outcome:
    """Decode, check and (re-)encode one entry (plus codec latents); any problem becomes the reason,
    including running out of memory or an unexpected decoder error (never the end of the run)."""
    suffix = entry.media.suffix.lower().lstrip(".")  # which demuxer may open it
    try:
        data = entry.media.read_bytes()
        if entry.kind == "image":
            task, media = "image", [_image(data, target, limits)]
        elif entry.kind == "audio":
            task, media = "audio", _audio(data, target, limits, AUDIO_CONTAINERS.get(suffix))
        else:
            task, media = _mp4(data, target, limits, suffix)
        if latents is not None:
            media = [({**fields, **latent_fields(task, fields, latents)}, stats) for fields, stats in media]
    except (*DECODE_ERRORS, ValueError, OSError) as err:
        return Outcome(entry.key, str(entry.media), reason=_reason(err))
    except Exception as err:  # MemoryError, or a decoder failing in a way it does not document
        return Outcome(entry.key, str(entry.media), reason=f"{type(err).__name__}: {_reason(err)}")
    samples = []
    for index, (fields, stats) in enumerate(media):
        meta, key = dict(entry.meta), entry.key
        if target.duration is not None and task != "image":
            key = f"{entry.key}_c{index:03d}"
            meta["clip"] = {"source": entry.key, "index": index, "start": index * target.duration}
        text = {"txt": entry.caption, "json": json.dumps(meta, sort_keys=True, ensure_ascii=False)}
        samples.append(Prepared(key, {**fields, **text}, stats))
    return Outcome(entry.key, str(entry.media), task, samples)


def _reason(err: BaseException) -> str:
    """The error's message without object addresses, so that reports are the same on every run."""
    text = getattr(err, "error_string", None) or str(err) or type(err).__name__  # soundfile: error_string
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", text)


# ---------------------------------------------------------------------- images
def _image(data: bytes, target: Target, limits: DecodeLimits) -> tuple[dict[str, bytes], dict]:
    """Original bytes unless resized or in a format the readers do not take; then lossless PNG."""
    img = open_image(data, limits)
    name = IMAGE_FIELD_OF_FORMAT.get(img.format)
    if target.image_size is not None or name is None:
        img = normalize_mode(img)
        if target.image_size is not None:
            img = resize_center_crop(img, *target.image_size)
        data, name = png_bytes(img), "png"
    return {name: data}, {"resolution": f"{img.height}x{img.width}"}


# ---------------------------------------------------------------------- clip geometry
def clip_spec(
    duration: float, fps: float, size: tuple[int, int], sample_rate: int, channels: int = 1
) -> ClipSpec:
    """A ClipSpec for decoding any geometry: patch sizes of 1 so that nothing has to divide."""
    h, w = size
    return ClipSpec(
        duration=duration,
        fps=fps,
        height=h,
        width=w,
        sample_rate=sample_rate,
        image_height=h,
        image_width=w,
        audio_channels=channels,
        image_patch=1,
        video_patch=(1, 1, 1),
        audio_patch=1,
    )


def whole_span(length: float, fps: float | None, sample_rate: int | None) -> float:
    """The longest span <= length that is a whole number of frames and of audio samples."""
    periods = [1 / Fraction(fps).limit_denominator(1001)] if fps else []
    periods += [Fraction(1, sample_rate)] if sample_rate else []
    num = math.lcm(*(p.numerator for p in periods))
    den = math.gcd(*(p.denominator for p in periods))
    step = Fraction(num, den)
    return float(math.floor(Fraction(length + 1e-9) / step) * step)


def _clip_count(length: float, duration: float, slack: float) -> int:
    count = math.floor((length + slack) / duration + 1e-9)
    if count < 1:
        raise ValueError(f"shorter than the clip duration ({length:.3f}s < {duration:g}s)")
    return count


def _groups(count: int, clip_bytes: int) -> Iterator[tuple[int, int]]:
    """(first clip, number of clips) per decode call, keeping about _GROUP_BYTES in memory."""
    size = max(1, _GROUP_BYTES // max(clip_bytes, 1))
    for first in range(0, count, size):
        yield first, min(size, count - first)


# ---------------------------------------------------------------------- audio
def _flac(wave: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    """[C, N] or [N, C] samples -> flac bytes (libFLAC writes no timestamp)."""
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def _audio(
    data: bytes, target: Target, limits: DecodeLimits, container: str | None = None
) -> list[tuple[dict[str, bytes], dict]]:
    """wav / flac / mp3 / ogg through libsndfile, or the audio of a `container` (m4a) through PyAV."""
    keep = not target.reencodes("audio")
    if container is None:
        rate, channels, length, stored = _sndfile_audio(data, limits, keep)
    else:
        wave, rate = read_audio(data, limits, container)  # [C, N]
        channels, length = wave.shape[0], wave.shape[1] / rate
        stored = _flac(np.clip(wave, -1, 1).T, rate) if keep else b""
    if length == 0:
        raise ValueError("audio has no samples")
    if keep:
        return [({"flac": stored}, {"duration": length, "sample_rate": rate})]
    rate_out = target.sample_rate or rate
    channels = target.audio_channels or min(channels, 2)
    duration = target.duration or whole_span(length, None, rate_out)
    count = _clip_count(length, duration, 1 / rate)
    n = round(duration * rate_out)
    out = []
    for first, size in _groups(count, n * channels * 4):
        spec = clip_spec(duration * size, rate_out, (2, 2), rate_out, channels)  # fps = rate: 1 sample
        wave_out = decode_audio(data, spec, first * duration, limits, container)
        for i in range(size):
            clip = np.clip(wave_out[:, i * n : (i + 1) * n], -1, 1).T
            out.append(({"flac": _flac(clip, rate_out)}, {"duration": duration, "sample_rate": rate_out}))
    return out


def _sndfile_audio(data: bytes, limits: DecodeLimits, keep: bool) -> tuple[int, int, float, bytes]:
    """(rate, channels, seconds, the bytes to store when kept) of a libsndfile format, every sample
    decoded once; a wav is stored as flac, a flac as it is."""
    check_audio_format(data, limits)
    try:
        info = soundfile.info(io.BytesIO(data))
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"cannot decode audio: {_reason(err)}") from err
    if info.format not in limits.audio_formats:
        raise ValueError(f"audio format {info.format} is not allowed ({'/'.join(limits.audio_formats)})")
    rate = info.samplerate
    limits.check_audio(rate, info.channels)
    limits.check_duration(info.frames / rate)  # before anything is read: the header may promise more
    pcm = _FLAC_SUBTYPE.get(info.subtype)
    convert = pcm or "PCM_24" if keep and info.format != "FLAC" else None
    frames, converted = _scan_audio(data, "int32" if pcm else "float32", convert)
    return rate, info.channels, frames / rate, converted if converted is not None else data


def _scan_audio(data: bytes, dtype: str, flac_subtype: str | None) -> tuple[int, bytes | None]:
    """Decode every sample, a block at a time (memory stays bounded whatever the header says): the
    number of frames, and the audio as flac of `flac_subtype` when one is given."""
    frames, out = 0, io.BytesIO()
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as src, contextlib.ExitStack() as stack:
            dst = None
            if flac_subtype is not None:
                dst = soundfile.SoundFile(out, "w", src.samplerate, src.channels, flac_subtype, format="FLAC")
                stack.enter_context(dst)
            for block in src.blocks(blocksize=1 << 16, dtype=dtype, always_2d=True):  # [n, C]
                frames += block.shape[0]
                if dst is not None:
                    dst.write(block)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"cannot decode audio: {_reason(err)}") from err
    return frames, (out.getvalue() if flac_subtype is not None else None)


# ---------------------------------------------------------------------- mp4 (video, av)
_MUXER = {"mp4": "mp4", "webm": "webm", "mkv": "matroska"}  # the field original bytes are kept in


def _without_audio(data: bytes, container: str, field: str) -> bytes:
    """The video with only its first video stream, packets copied as they are (no re-encoding)."""
    buf = io.BytesIO()
    with av.open(io.BytesIO(data), format=container) as src, av.open(buf, "w", format=_MUXER[field]) as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        for packet in src.demux(stream):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.stream = out
            dst.mux(packet)
    return buf.getvalue()


def _mp4(
    data: bytes, target: Target, limits: DecodeLimits, suffix: str = "mp4"
) -> tuple[str, list[tuple[dict[str, bytes], dict]]]:
    """A video container (mp4 / mov / m4v / webm / mkv, by `suffix`): kept in its own field (`mp4`,
    `webm` or `mkv`) once every frame and sample decodes, or re-encoded to H.264 (+ AAC) mp4."""
    container = VIDEO_CONTAINERS.get(suffix, "mp4")
    field = "mp4" if container == "mp4" else suffix  # mov / m4v are read by the mp4 demuxer
    info = probe(data, limits, container)
    if not info.has_video:
        raise ValueError(f"{suffix} has no video stream")
    if info.fps <= 0 or info.duration <= 0:
        raise ValueError(f"{suffix} has no frame rate or duration")
    task = "av" if info.has_audio and not target.no_audio else "video"
    rate = info.sample_rate if task == "av" else None
    if not target.reencodes(task):
        span = whole_span(info.duration, info.fps, rate)
        spec = clip_spec(span, info.fps, (_CHECK_SIZE, _CHECK_SIZE), rate or 16_000)
        decode_av(data, spec, audio=task == "av", limits=limits, container=container)  # all of it decodes
        stored = _without_audio(data, container, field) if info.has_audio and task == "video" else data
        stats = {"resolution": f"{info.height}x{info.width}", "duration": info.duration}
        return task, [({field: stored}, stats | ({"sample_rate": rate} if rate else {}))]
    return task, _reencode_mp4(data, info, task, target, limits, container)


def _reencode_mp4(
    data: bytes, info: MediaInfo, task: str, target: Target, limits: DecodeLimits, container: str
) -> list[tuple[dict[str, bytes], dict]]:
    fps = target.fps or info.fps
    height, width = target.video_size or (info.height - info.height % 2, info.width - info.width % 2)
    rate = (target.sample_rate or info.sample_rate) if task == "av" else None
    channels = target.audio_channels or max(1, min(info.channels, 2))
    duration = target.duration or whole_span(info.duration, fps, rate)
    count = _clip_count(info.duration, duration, 0.5 / fps)
    frames, samples = round(duration * fps), round(duration * (rate or 0))
    stats = {"resolution": f"{height}x{width}", "duration": duration} | (
        {"sample_rate": rate} if rate else {}
    )
    out = []
    for first, size in _groups(count, frames * height * width * 3 + samples * channels * 4):
        spec = clip_spec(duration * size, fps, (height, width), rate or 16_000, channels)
        clip = decode_av(data, spec, first * duration, audio=task == "av", limits=limits, container=container)
        for i in range(size):
            video = clip.video[i * frames : (i + 1) * frames]
            audio = None if clip.audio is None else clip.audio[:, i * samples : (i + 1) * samples]
            out.append(({"mp4": encode_mp4(video, fps, audio, rate or 16_000)}, stats))
    return out
