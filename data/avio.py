"""Video and audio bytes <-> arrays shaped by a clip spec (PyAV for mp4, soundfile for wav/flac).

    clip = decode_av(mp4_bytes, spec, start=0.5)   # clip.video uint8 [T, H, W, 3], clip.audio float32 [C, N]
    data = encode_mp4(clip.video, spec.fps, clip.audio, spec.sample_rate)

Alignment. Both streams are placed on the container's clock from their presentation timestamps:
frame i of the clip is the source frame on screen at `start + i / fps`, and audio sample j is the
source audio at `start + j / sample_rate` (after resampling to the spec rate and channel count). An
event at time tau in the source is therefore at frame floor((tau - start) fps) and sample
round((tau - start) rate) in the clip, which is what the transformer's time ids assume.

A source shorter than the window by more than one video frame is an error (ValueError); a shortfall
of less than a frame (codec padding, rounding) is filled by holding the last frame and by silence.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import soundfile
from av.video.reformatter import VideoReformatter

from selfflow.data.decode import LIMITS, DecodeLimits, resize_center_crop
from selfflow.tokenizers.spec import ClipSpec

AV_ERRORS = (av.error.FFmpegError, ValueError, OSError, EOFError, IndexError)
_AUDIO_MARGIN = 0.25  # seconds of audio decoded around a window (codec priming, resampler filter)
_SEEK_FROM = 1.0  # a window starting later than this many seconds is reached by seeking


@dataclass(frozen=True)
class MediaInfo:
    duration: float  # seconds (the longest stream)
    has_video: bool
    has_audio: bool
    fps: float = 0.0
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0


@dataclass
class Clip:
    video: np.ndarray | None  # uint8 [T, H, W, 3]
    audio: np.ndarray | None  # float32 [C, N] in [-1, 1]


def _open(data: bytes, container: str = "mp4") -> av.container.InputContainer:
    """Only the `container` demuxer is tried (no probing through every format FFmpeg knows)."""
    try:
        return av.open(io.BytesIO(data), mode="r", format=container)
    except AV_ERRORS as err:
        raise ValueError(f"cannot open media as {container}: {err}") from err


def _info(box: av.container.InputContainer) -> MediaInfo:
    v = box.streams.video[0] if box.streams.video else None
    a = box.streams.audio[0] if box.streams.audio else None
    spans = [float(s.duration * s.time_base) for s in (v, a) if s is not None and s.duration]
    duration = max(spans) if spans else (box.duration or 0) / 1e6
    return MediaInfo(
        duration=duration,
        has_video=v is not None,
        has_audio=a is not None,
        fps=float(v.average_rate or 0) if v is not None else 0.0,
        width=v.codec_context.width if v is not None else 0,
        height=v.codec_context.height if v is not None else 0,
        sample_rate=a.codec_context.sample_rate if a is not None else 0,
        channels=a.codec_context.channels if a is not None else 0,
    )


def _checked(box: av.container.InputContainer, limits: DecodeLimits) -> MediaInfo:
    """The header's facts, once they are within `limits` (ValueError naming the first that is not)."""
    info = _info(box)
    limits.check_duration(info.duration)
    if info.has_video:
        codec = box.streams.video[0].codec_context.name
        if codec not in limits.video_codecs:
            raise ValueError(f"video codec {codec} is not allowed ({'/'.join(limits.video_codecs)})")
        limits.check_frame(info.width, info.height, info.fps)
    if info.has_audio:
        codec = box.streams.audio[0].codec_context.name
        if codec not in limits.audio_codecs:
            raise ValueError(f"audio codec {codec} is not allowed ({'/'.join(limits.audio_codecs)})")
        limits.check_audio(info.sample_rate, info.channels)
    return info


def probe(data: bytes, limits: DecodeLimits = LIMITS, container: str = "mp4") -> MediaInfo:
    """Streams, duration, frame rate, size and sample rate of an mp4 (or another `container`: "matroska"
    for webm / mkv), read from its header and checked against `limits` (ValueError)."""
    with _open(data, container) as box:
        return _checked(box, limits)


def has_audio_stream(data: bytes, container: str = "mp4") -> bool:
    """Whether the container's header lists an audio stream (ValueError if it cannot be opened)."""
    with _open(data, container) as box:
        return bool(box.streams.audio)


def sniff_audio(data: bytes) -> str | None:
    """The libsndfile format name of audio bytes from their first bytes (None when not one of these),
    so that libsndfile, which would parse any of its many formats, only sees an allowed one."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "MP3"
    return None


def check_audio_format(data: bytes, limits: DecodeLimits = LIMITS) -> str:
    """The sniffed format when `limits.audio_formats` allows it, else ValueError."""
    kind = sniff_audio(data)
    if kind not in limits.audio_formats:
        allowed = "/".join(limits.audio_formats)
        raise ValueError(f"audio format {kind or 'unknown'} is not allowed ({allowed})")
    return kind


def audio_duration(data: bytes, limits: DecodeLimits = LIMITS, container: str | None = None) -> float:
    """Seconds of audio that the header promises (libsndfile formats, or `container` through PyAV)."""
    if container is not None:
        return probe(data, limits, container).duration
    check_audio_format(data, limits)
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot decode audio: {getattr(err, 'error_string', err)}") from err
    return info.frames / info.samplerate if info.samplerate > 0 else 0.0


def _frames(box: av.container.InputContainer, spec: ClipSpec, start: float, max_fps: float) -> np.ndarray:
    """The spec's frames of the first video stream: [T, H, W, 3] uint8, frame i shown at start + i/fps.
    Each frame is resized as soon as it is picked: one source-sized frame is held at a time."""
    stream = box.streams.video[0]
    targets = [start + i / spec.fps for i in range(spec.num_frames)]
    picked: list[np.ndarray | None] = [None] * len(targets)
    last, last_rgb, last_time, i, decoded = None, None, -math.inf, 0, 0
    budget = max_fps * (targets[-1] + 1.0) + 16  # frames that can precede the window's end
    for frame in box.decode(stream):
        time = float(frame.pts * stream.time_base) if frame.pts is not None else last_time + 1 / spec.fps
        while i < len(targets) and targets[i] < time - 1e-6:  # the previous frame is on screen at targets[i]
            last_rgb = last_rgb if last_rgb is not None or last is None else _rgb(last, spec)
            picked[i], i = last_rgb, i + 1
        last, last_rgb, last_time, decoded = frame, None, time, decoded + 1
        if i == len(targets):
            break
        if decoded > budget:
            raise ValueError(f"{decoded} frames decoded before {time:.3f}s: timestamps do not advance")
    slack = 1.0 / spec.fps
    while i < len(targets) and last is not None and targets[i] - last_time <= slack + 1e-6:
        last_rgb = last_rgb if last_rgb is not None else _rgb(last, spec)
        picked[i], i = last_rgb, i + 1  # the last frame stays on screen for one frame interval
    if i < len(targets) or any(f is None for f in picked):
        raise ValueError(
            f"video covers {last_time + slack:.3f}s, the clip needs {start:.3f}..{targets[-1]:.3f}s"
        )
    return np.stack(picked)  # type: ignore[arg-type]


def _rgb(frame: av.VideoFrame, spec: ClipSpec) -> np.ndarray:
    img = frame.to_image()  # PIL RGB
    return np.asarray(resize_center_crop(img, spec.height, spec.width))  # [H, W, 3]


def _layout(channels: int) -> str:
    return "mono" if channels == 1 else "stereo"


def _audio_stream(
    box: av.container.InputContainer, rate: int, channels: int, until: float = math.inf
) -> tuple[np.ndarray, float]:
    """Audio resampled to `rate` and `channels` up to about `until` seconds: ([C, N] float32, time of
    sample 0)."""
    stream = box.streams.audio[0]
    resampler = av.AudioResampler(format="fltp", layout=_layout(channels), rate=rate)
    chunks, first = [], None
    for frame in box.decode(stream):
        time = float(frame.pts * stream.time_base) if frame.pts is not None else None
        if first is None:
            first = time if time is not None else 0.0
        chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        if time is not None and time > until:  # the window is covered: the rest is never decoded
            break
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
    if not chunks:
        raise ValueError("audio stream has no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32), first or 0.0


def _window(audio: np.ndarray, origin: float, spec: ClipSpec, start: float) -> np.ndarray:
    """Samples [start, start + duration) of audio whose sample 0 is at `origin` seconds -> [C, N]."""
    n, rate = spec.num_samples, spec.sample_rate
    offset = round((start - origin) * rate)
    out = np.zeros((audio.shape[0], n), np.float32)
    src_lo, src_hi = max(offset, 0), min(offset + n, audio.shape[1])
    covered = max(src_hi - src_lo, 0)
    if n - covered > rate / spec.fps + 1:
        raise ValueError(f"audio covers {covered / rate:.3f}s of the {n / rate:.3f}s clip at {start:.3f}s")
    if covered:
        out[:, src_lo - offset : src_hi - offset] = audio[:, src_lo:src_hi]
    return out


def decode_av(
    data: bytes,
    spec: ClipSpec,
    start: float = 0.0,
    video: bool = True,
    audio: bool = True,
    limits: DecodeLimits = LIMITS,
    container: str = "mp4",
) -> Clip:
    """The spec-sized clip at `start` seconds of an mp4's (or another `container`'s) video and/or audio
    (ValueError if missing or outside `limits`). Decoding stops once the window is covered."""
    with _open(data, container) as box:
        _checked(box, limits)
        try:
            if video and not box.streams.video:
                raise ValueError("no video stream")
            if audio and not box.streams.audio:
                raise ValueError("no audio stream")
            if video:
                _seek(box, box.streams.video[0], start)
            frames = _frames(box, spec, start, limits.max_fps) if video else None
            if audio:
                _seek(box, box.streams.audio[0], start - _AUDIO_MARGIN)
                until = start + spec.duration + _AUDIO_MARGIN
                samples, origin = _audio_stream(box, spec.sample_rate, spec.audio_channels, until)
            sound = _window(samples, origin, spec, start) if audio else None
        except (av.error.FFmpegError, EOFError, IndexError) as err:
            raise ValueError(f"cannot decode media: {err}") from err
    return Clip(frames, sound)


def _seek(box: av.container.InputContainer, stream: av.stream.Stream, seconds: float) -> None:
    """To the last keyframe of `stream` at or before `seconds`, when that is far enough in to matter
    (decoding from 0 costs time in proportion to a window's start); else back to the beginning."""
    if seconds > _SEEK_FROM:
        box.seek(int(seconds / stream.time_base), stream=stream, backward=True, any_frame=False)
    else:
        box.seek(0)


def read_audio(data: bytes, limits: DecodeLimits = LIMITS, container: str = "mp4") -> tuple[np.ndarray, int]:
    """Every audio sample of a container (e.g. m4a) at its own rate, at most 2 channels: ([C, N] float32,
    rate), after its header passed `limits`."""
    with _open(data, container) as box:
        info = _checked(box, limits)
        if not info.has_audio:
            raise ValueError("no audio stream")
        try:
            wave, _ = _audio_stream(box, info.sample_rate, min(info.channels, 2))
        except (av.error.FFmpegError, EOFError, IndexError) as err:
            raise ValueError(f"cannot decode media: {err}") from err
    return wave, info.sample_rate


def decode_audio(
    data: bytes,
    spec: ClipSpec,
    start: float = 0.0,
    limits: DecodeLimits = LIMITS,
    container: str | None = None,
) -> np.ndarray:
    """wav / flac / ogg / mp3 (soundfile, `limits.audio_formats`), or the audio of a `container` (PyAV,
    e.g. "mp4" for m4a) -> the spec's [C, N] float32 at `start`. Only the window (plus a margin for the
    resampler) is read, after the header passed `limits`."""
    if container is not None:
        return decode_av(data, spec, start, video=False, audio=True, limits=limits, container=container).audio
    check_audio_format(data, limits)
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot decode audio: {getattr(err, 'error_string', err)}") from err
    if info.format not in limits.audio_formats:
        raise ValueError(f"audio format {info.format} is not allowed ({'/'.join(limits.audio_formats)})")
    rate = info.samplerate
    limits.check_audio(rate, info.channels)
    limits.check_duration(info.frames / rate)
    first, count = _read_span(rate, spec, start)
    try:
        wave, _ = soundfile.read(
            io.BytesIO(data), start=first, frames=count, dtype="float32", always_2d=True
        )  # [N, C]
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot decode audio: {getattr(err, 'error_string', err)}") from err
    if wave.shape[0] == 0:
        raise ValueError("audio has no samples")
    return _window(resample(wave.T, rate, spec), first / rate, spec, start)


def _read_span(rate: int, spec: ClipSpec, start: float) -> tuple[int, int]:
    """(first source sample, count) covering the window at `start` with a margin for the resampler's
    filter. The first sample is a whole number of output samples from 0, so the resampled window lies
    on the same sample grid as a resample of the whole file."""
    step = rate // math.gcd(rate, spec.sample_rate)  # source samples per whole output sample grid step
    first = max(0, math.floor((start - _AUDIO_MARGIN) * rate / step)) * step
    last = math.ceil((start + spec.duration + _AUDIO_MARGIN) * rate)
    return first, last - first


def resample(wave: np.ndarray, rate: int, spec: ClipSpec) -> np.ndarray:
    """[C, N] float32 at `rate` -> [spec.audio_channels, M] at spec.sample_rate (libswresample)."""
    channels = spec.audio_channels
    if wave.shape[0] != channels:  # down-mix to mono, or repeat mono to stereo
        wave = wave.mean(0, keepdims=True).repeat(channels, 0)
    if rate == spec.sample_rate:
        return np.ascontiguousarray(wave, dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(wave, np.float32), format="fltp", layout=_layout(channels)
    )
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    resampler = av.AudioResampler(format="fltp", layout=_layout(channels), rate=spec.sample_rate)
    parts = [f.to_ndarray() for f in resampler.resample(frame)] + [
        f.to_ndarray() for f in resampler.resample(None)
    ]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _bitexact(stream: av.stream.Stream) -> None:
    """No version strings or timestamps in the output, one thread (PyAV overrides a "threads" option)."""
    stream.codec_context.flags |= av.codec.context.Flags.bitexact
    stream.codec_context.thread_count = 1
    stream.codec_context.thread_type = "NONE"


def encode_mp4(
    video: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16_000,
    crf: int = 18,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """uint8 [T, H, W, 3] (+ float32 [C, N] audio) -> mp4 bytes: H.264 yuv420p (+ AAC).

    Reproducible: the same input gives the same bytes with the same PyAV build (single-threaded,
    bitexact flags; x264's macroblock-tree lookahead is off because it made bytes and pixels vary
    between identical runs on small frames, 32..192 px seen). Tested after decodes that leave the
    allocator dirty, which once changed the output."""
    t, h, w, _ = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as box:
        box.flags |= av.container.Flags.bitexact.value
        box.metadata.update(metadata or {})  # container tags, e.g. {"comment": json.dumps(...)}
        options = {"crf": str(crf), "preset": "medium", "rc-lookahead": "0", "mbtree": "0"}
        vs = box.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        _bitexact(vs)
        streams = [vs]
        if audio is not None:
            aus = box.add_stream("aac", rate=sample_rate, layout=_layout(audio.shape[0]))
            aus.bit_rate = 64_000
            _bitexact(aus)
            streams.append(aus)
        to_yuv = VideoReformatter()  # one converter for all frames (a new one per frame is ~20x slower)
        for i, rgb in enumerate(video):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = to_yuv.reformat(frame, format="yuv420p")  # BT.601 limited range, as decoders assume
            frame.pts = i
            box.mux(vs.encode(frame))
        if audio is not None:
            _encode_audio(box, aus, audio, sample_rate)
        for s in streams:
            box.mux(s.encode(None))
    return buf.getvalue()


def _encode_audio(
    box: av.container.OutputContainer, stream: av.AudioStream, audio: np.ndarray, rate: int
) -> None:
    step = 1024  # samples per AAC frame
    wave = np.ascontiguousarray(np.clip(audio, -1, 1), dtype=np.float32)  # [C, N]
    for lo in range(0, wave.shape[1], step):
        chunk = np.ascontiguousarray(wave[:, lo : lo + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=_layout(wave.shape[0]))
        frame.sample_rate, frame.pts, frame.time_base = rate, lo, Fraction(1, rate)
        box.mux(stream.encode(frame))
