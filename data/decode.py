"""Pure image decoding and geometry, shared by the shard tool and the training reader.

No torch here: the offline tools import this module and should start fast. Video and audio
(PyAV, soundfile) live in `avio.py`.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

# Shard field of an encoded image, keyed by the format PIL detects in the bytes.
IMAGE_FIELD_OF_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
IMAGE_FIELDS = tuple(IMAGE_FIELD_OF_FORMAT.values())
RESAMPLE = Image.Resampling.LANCZOS
_BACKGROUND = 255  # transparent pixels are flattened onto white


def open_image(data: bytes) -> Image.Image:
    """Decode every pixel now (`load`), so a truncated or corrupt file fails here with a ValueError."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as err:  # its message holds the buffer's address: not reproducible
        raise ValueError("cannot decode image: not a known image format") from err
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
