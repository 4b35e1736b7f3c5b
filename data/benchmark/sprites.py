"""Drawing pieces shared by the image and video builders: text glyphs, colour emoji, compositing.

Sprites are RGBA images cropped to their ink. `place` puts one on a canvas at a fractional
position (bilinear, premultiplied alpha), so slow motion stays smooth instead of stepping by pixels.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from selfflow.data.benchmark.common import RGB
from selfflow.data.packaged import emoji_font

EMOJI_SIZE = 109  # the only size at which NotoColorEmoji's CBDT bitmaps are drawn
_SKIP_CATEGORIES = {"Cc", "Cf", "Mn", "Me", "Zs", "Nd", "Sk", "Po"}  # keycap parts, joiners, tags
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)  # flag letters: meaningless alone


@functools.lru_cache(maxsize=64)
def font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def text_mask(text: str, font_path: Path, size: int) -> Image.Image:
    """An "L" mask of `text`, cropped to its ink (anti-aliased coverage 0..255)."""
    face = font(font_path, size)
    left, top, right, bottom = face.getbbox(text)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=face, fill=255)
    box = mask.getbbox()
    if box is None:
        raise ValueError(f"font {font_path.name} draws nothing for {text!r}")
    return mask.crop(box)


def tinted(mask: Image.Image, rgb: RGB) -> Image.Image:
    """A solid-colour RGBA sprite whose alpha is `mask`."""
    sprite = Image.new("RGBA", mask.size, (*rgb, 255))
    sprite.putalpha(mask)
    return sprite


@functools.lru_cache(maxsize=1)
def emoji_table() -> tuple[tuple[int, str], ...]:
    """(code point, lower-case Unicode name) of every single-code-point emoji the font draws and this
    Python's Unicode database names, in code point order."""
    from fontTools.ttLib import TTFont  # comes with matplotlib; only this builder needs it

    cmap = TTFont(str(emoji_font()), lazy=True).getBestCmap()
    table = []
    for cp in sorted(cmap):
        name = unicodedata.name(chr(cp), "")
        drawable = unicodedata.category(chr(cp)) not in _SKIP_CATEGORIES and cp not in _REGIONAL_INDICATORS
        if name and drawable and not name.startswith("EMOJI COMPONENT"):  # hair parts drawn in a dashed box
            table.append((cp, name.lower()))
    return tuple(table)


@functools.lru_cache(maxsize=2048)
def emoji_image(codepoint: int) -> Image.Image:
    """The font's RGBA bitmap of one emoji (about 128 px), cropped to its opaque pixels."""
    face = font(emoji_font(), EMOJI_SIZE)
    char = chr(codepoint)
    _, _, right, bottom = face.getbbox(char)
    canvas = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=face, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"the emoji font draws nothing for U+{codepoint:04X}")
    return canvas.crop(box)


def resize_rgba(sprite: Image.Image, longest: int) -> Image.Image:
    """Scale so the longer side is `longest` px (Lanczos on premultiplied alpha: no dark fringes)."""
    scale = longest / max(sprite.size)
    size = (max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale)))
    return sprite.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")


def place(canvas: Image.Image, sprite: Image.Image, x: float, y: float) -> Image.Image:
    """`canvas` (RGB) with `sprite` (RGBA) over it, the sprite's top-left corner at (x, y) in pixels."""
    padded = ImageOps.expand(sprite, 2, fill=(0, 0, 0, 0)).convert("RGBa")  # lets the edges blend
    shift = (1, 0, 2 - x, 0, 1, 2 - y)  # output pixel (u, v) samples sprite pixel (u - x, v - y)
    layer = padded.transform(canvas.size, Image.Transform.AFFINE, shift, Image.Resampling.BILINEAR)
    return Image.alpha_composite(canvas.convert("RGBA"), layer.convert("RGBA")).convert("RGB")


def solid(size: tuple[int, int], rgb: RGB) -> Image.Image:
    """An RGB canvas of (width, height) filled with one colour."""
    return Image.new("RGB", size, rgb)


def frames_array(frames: list[Image.Image]) -> np.ndarray:
    """RGB frames -> uint8 [T, H, W, 3]."""
    return np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
