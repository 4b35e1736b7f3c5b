"""Pure image decoding and geometry, shared by the shard tool and the training reader, and the
limits every decoder checks before it allocates (`DecodeLimits`).

No torch here: the offline tools import this module and should start fast. Video and audio
(PyAV, soundfile) live in `avio.py`.

Hostile input. Only the formats a limit set allows are ever tried (Pillow runs no other plugin, PyAV
no other demuxer), and sizes, durations, rates and channel counts are read from the header and
checked before any pixel or sample is decoded, so one crafted file costs at most what the limits
allow (README, "Failure behaviour").
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

# Shard field of an encoded image, keyed by the format PIL detects in the bytes.
IMAGE_FIELD_OF_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
IMAGE_FIELDS = tuple(IMAGE_FIELD_OF_FORMAT.values())
RESAMPLE = Image.Resampling.LANCZOS
_BACKGROUND = 255  # transparent pixels are flattened onto white


@dataclass(frozen=True)
class DecodeLimits:
    """What one sample may be, checked from its header before decoding (`data.limits` in the config).

    Peak memory of decoding one sample is then bounded by about 4 bytes x `max_image_pixels` for an
    image, a few source frames of `max_frame_pixels` plus the clip for video, and `max_sample_rate` x
    `max_channels` x the clip's seconds for audio (tests/test_hostile_data.py measures it)."""

    image_formats: list[str] = field(default_factory=lambda: ["PNG", "JPEG", "WEBP"])  # Pillow names
    audio_formats: list[str] = field(default_factory=lambda: ["WAV", "FLAC", "OGG", "MP3"])  # libsndfile
    video_codecs: list[str] = field(default_factory=lambda: ["h264", "hevc", "vp8", "vp9", "av1", "mpeg4"])
    audio_codecs: list[str] = field(
        default_factory=lambda: ["aac", "mp3", "opus", "vorbis", "flac", "alac", "pcm_s16le", "pcm_f32le"]
    )
    max_image_pixels: int = 50_000_000  # width x height of a still image
    max_frame_pixels: int = 4096 * 2160  # width x height of a video frame
    max_fps: float = 240.0
    max_duration_s: float = 3600.0  # a source video / audio file
    min_sample_rate: int = 4000
    max_sample_rate: int = 192_000
    max_channels: int = 8
    max_field_mb: float = 1024.0  # compressed bytes of one field of a shard sample

    def __post_init__(self) -> None:
        numbers = {k: v for k, v in vars(self).items() if isinstance(v, int | float)}
        bad = [k for k, v in numbers.items() if not v > 0]
        if bad or self.min_sample_rate > self.max_sample_rate:
            raise ValueError(f"data.limits: {bad or 'min_sample_rate'} must be positive (and min <= max)")

    def check_image(self, width: int, height: int) -> None:
        if width * height > self.max_image_pixels:
            raise ValueError(f"image is {width}x{height}, over the {self.max_image_pixels} pixel limit")

    def check_frame(self, width: int, height: int, fps: float) -> None:
        if width * height > self.max_frame_pixels:
            raise ValueError(f"video is {width}x{height}, over the {self.max_frame_pixels} pixel frame limit")
        if fps > self.max_fps:
            raise ValueError(f"video has {fps:g} frames/s, over the {self.max_fps:g} limit")

    def check_audio(self, rate: int, channels: int) -> None:
        if not self.min_sample_rate <= rate <= self.max_sample_rate:
            raise ValueError(
                f"audio sample rate {rate} Hz is outside {self.min_sample_rate}..{self.max_sample_rate}"
            )
        if not 1 <= channels <= self.max_channels:
            raise ValueError(f"audio has {channels} channels (1..{self.max_channels} allowed)")

    def check_duration(self, seconds: float) -> None:
        if not seconds <= self.max_duration_s:  # also NaN
            raise ValueError(f"media lasts {seconds:.0f}s, over the {self.max_duration_s:g}s limit")


LIMITS = DecodeLimits()  # the defaults, for callers without a config


def open_image(data: bytes, limits: DecodeLimits = LIMITS) -> Image.Image:
    """Decode every pixel now (`load`), so a truncated or corrupt file fails here with a ValueError.
    Only `limits.image_formats` are tried, and the size is checked from the header first."""
    try:
        img = Image.open(io.BytesIO(data), formats=limits.image_formats)
        limits.check_image(img.width, img.height)
        img.load()
    except UnidentifiedImageError as err:  # its message holds the buffer's address: not reproducible
        allowed = "/".join(limits.image_formats)
        raise ValueError(f"cannot decode image: not an allowed image format ({allowed})") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image: {err}") from err
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image has no pixels ({img.width}x{img.height})")
    return img


def normalize_mode(img: Image.Image) -> Image.Image:
    """Any PIL mode -> "L", "RGB" or "RGBA" (alpha kept only where the image has transparency)."""
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if has_alpha:
        return img if img.mode == "RGBA" else img.convert("RGBA")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("1", "I", "I;16", "F"):
        return img.convert("L")
    return img.convert("RGB")


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Flatten alpha onto white and convert to 3-channel RGB or 1-channel L."""
    if channels not in (1, 3):
        raise ValueError(f"images can have 1 or 3 channels, not {channels}")
    img = normalize_mode(img)
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, (_BACKGROUND,) * 3)
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    return img.convert("RGB" if channels == 3 else "L")


def resize_center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover height x width keeping the aspect ratio, then cut the centre (one resample)."""
    if img.size == (width, height):
        return img
    scale = max(width / img.width, height / img.height)
    crop_w, crop_h = width / scale, height / scale  # the source window that maps onto the output
    left, top = (img.width - crop_w) / 2, (img.height - crop_h) / 2
    return img.resize((width, height), RESAMPLE, box=(left, top, left + crop_w, top + crop_h))


def resize_pad(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to fit inside height x width keeping the aspect ratio, then extend the border pixels to
    fill the rest (letterboxing that stays invisible on plain backgrounds)."""
    if img.size == (width, height):
        return img
    scale = min(width / img.width, height / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    pixels = np.asarray(img.resize((w, h), RESAMPLE))  # [h, w] or [h, w, C]
    top, left = (height - h) // 2, (width - w) // 2
    pad = [(top, height - h - top), (left, width - w - left)] + [(0, 0)] * (pixels.ndim - 2)
    return Image.fromarray(np.pad(pixels, pad, mode="edge"))


FITS = {"crop": resize_center_crop, "pad": resize_pad}  # how an image meets the spec's size


def png_bytes(img: Image.Image) -> bytes:
    """Lossless, deterministic encoding (Pillow writes no timestamp chunk)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def parse_size(text: str) -> tuple[int, int]:
    """ "32x48" -> (32, 48) as (height, width); "32" -> (32, 32)."""
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not match:
        raise ValueError(f"size {text!r} is not HxW (e.g. 32x32) or a single number")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 1 or width < 1:
        raise ValueError(f"size {text!r} must be positive")
    return height, width
