"""Benchmark-side mp4 helpers: the frame-size check and a full decode for checking files.
Encoding is `selfflow.data.avio.encode_mp4` (reproducible bytes; see its docstring).

"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

from selfflow.data.decode import parse_size


def video_size(resolution: str) -> tuple[int, int]:
    """ "64x64" -> (64, 64) as (height, width), both even (yuv420p halves the chroma planes)."""
    height, width = parse_size(resolution)
    if height % 2 or width % 2 or min(height, width) < 16:
        raise ValueError(f"--resolution {resolution}: video frames need even sides of at least 16 px")
    return height, width


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    video_codec: str
    audio: np.ndarray | None  # float32 [S], the encoder's priming removed
    sample_rate: int | None
    audio_codec: str | None
    duration: float  # container duration, seconds


def decode_mp4(data: bytes) -> Clip:
    """Every frame and audio sample of an mp4 (e.g. to check a benchmark file or score a sample)."""
    with av.open(io.BytesIO(data)) as container:
        video = container.streams.video[0]
        fps = float(video.average_rate)
        codec = video.codec_context.name
        duration = float(container.duration or 0) / av.time_base
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            return Clip(frames, fps, codec, None, None, None, duration)
        stream = container.streams.audio[0]
        rate, audio_codec = stream.rate, stream.codec_context.name
        chunks = [f.to_ndarray()[0] for f in container.decode(audio=0)]  # planar: [n] each
    return Clip(frames, fps, codec, np.concatenate(chunks), rate, audio_codec, duration)
