"""T2I-text: a common English word on a sign, for OCR-scored text rendering.

Each image shows one word from VOCABULARY in one packaged font, in a colour that contrasts with the
background, at a random size and position. The caption quotes the word as drawn
(`a sign that says "Garden"`); the json holds the word, font, colours and the ink box, the ground
truth for OCR word accuracy and CER.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
from PIL import Image

from selfflow.data.benchmark.common import (
    PALETTE,
    Item,
    Task,
    check_n,
    colour_pair,
    contrast_ratio,
    cycled,
    item_rng,
)
from selfflow.data.benchmark.sprites import solid, text_mask
from selfflow.data.decode import parse_size, png_bytes
from selfflow.data.packaged import text_fonts

_VOCABULARY_TEXT = """
apple baby bag ball bank beach bear bed bell bird black blue boat body book bottle box bread bridge
brother brown bus cake camera candle car card cat chair cheese child church city clock cloud coat
coffee cookie corn cow cup dance desk dinner doctor dog door dragon dream dress duck earth egg
engine eye face farm father fire fish flag floor flower forest fork friend frog fruit garden gate
ghost gift girl glass gold grass green guitar hair hammer hand happy hat heart helmet hill horse
hotel house ice island jacket jungle key king kitchen kite knife lake lamp leaf lemon letter light
lion list lunch map market milk mirror money monkey moon morning mother mountain mouse music name
night north ocean orange owl paint paper park party pencil people phone piano picture pizza plane
plant planet pocket potato queen rabbit rain river road robot rock rocket room rose salad salt
school sea seed shadow sheep shirt shoe shop silver sister sky sleep smile snake snow sock song
space spoon spring star station stone storm street sugar summer sun table tea teacher tiger tomato
tooth tower town toy train tree truck turtle umbrella valley village water whale wind window winter
wolf wood world yellow zebra
"""
VOCABULARY = tuple(_VOCABULARY_TEXT.split())  # 206 common English words, 3-8 letters
CASES = (("lower", 0.5), ("title", 0.3), ("upper", 0.2))  # how the word is written, with odds
TEXT_CONTRAST = 4.5  # WCAG "normal text" level: every sign is easy to read
_MIN_FONT_PX = 8


def _styled(word: str, case: str) -> str:
    return {"lower": word, "title": word.title(), "upper": word.upper()}[case]


def _margin(height: int) -> int:
    return max(1, height // 10)  # blank border around the ink, so no letter touches the edge


def _fit(text: str, font_path, height: int, width: int, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """The text's ink mask at a random size that fits the canvas inside the margin, and that size."""
    margin = _margin(height)
    size = round(height * rng.uniform(0.6, 1.0))
    while size >= _MIN_FONT_PX:
        mask = text_mask(text, font_path, size)
        if mask.width <= width - 2 * margin and mask.height <= height - 2 * margin:
            return mask, size
        size -= 1
    raise ValueError(f"{text!r} does not fit a {height}x{width} sign in {font_path.name}")


def render_sign(word: str, height: int, width: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """One sign (RGB, width x height) and its ground truth."""
    fonts = text_fonts()
    font_path = fonts[int(rng.integers(len(fonts)))]
    case = str(rng.choice([c for c, _ in CASES], p=[p for _, p in CASES]))
    text = _styled(word, case)
    fg, bg = colour_pair(rng, TEXT_CONTRAST)
    mask, size = _fit(text, font_path, height, width, rng)
    margin = _margin(height)
    x = int(rng.integers(margin, width - margin - mask.width + 1))
    y = int(rng.integers(margin, height - margin - mask.height + 1))
    full_mask = Image.new("L", (width, height), 0)
    full_mask.paste(mask, (x, y))
    image = Image.composite(
        solid((width, height), PALETTE[fg]), solid((width, height), PALETTE[bg]), full_mask
    )
    meta = {
        "word": word,
        "text": text,
        "case": case,
        "font": font_path.name,
        "font_size": size,
        "color": fg,
        "color_rgb": list(PALETTE[fg]),
        "background": bg,
        "background_rgb": list(PALETTE[bg]),
        "contrast": round(contrast_ratio(PALETTE[fg], PALETTE[bg]), 2),
        "box": [x, y, x + mask.width, y + mask.height],  # ink box: x0, y0, x1, y1 (exclusive)
        "height": height,
        "width": width,
    }
    return image, meta


def text_items(args: argparse.Namespace) -> Iterator[Item]:
    """--n signs at --resolution HxW; every vocabulary word is used once per round of len(VOCABULARY)."""
    check_n(args.n)
    height, width = parse_size(args.resolution)
    if height < 16 or width < 2 * height:
        raise ValueError(f"--resolution {args.resolution}: signs need H >= 16 and W >= 2H (e.g. 32x128)")
    for index in range(args.n):
        word = VOCABULARY[cycled(args.seed, "text-word", index, len(VOCABULARY))]
        image, meta = render_sign(word, height, width, item_rng(args.seed, "text", index))
        yield Item(f"text_{index:06d}", png_bytes(image), "png", f'a sign that says "{meta["text"]}"', meta)


TASK = Task(
    text_items,
    "a vocabulary word on a sign, in a packaged font (--resolution 32x128 or 64x256)",
    {"tiny": {"n": 200, "resolution": "32x128"}, "full": {"n": 5_000, "resolution": "64x256"}},
)
