"""T2I-emoji: one Noto colour emoji on a plain coloured background, captioned by its Unicode name.

The emoji is drawn at the font's bitmap size, scaled to 50-90 % of the canvas with Lanczos and
placed at a random position: "a red apple on a blue background". Every emoji appears once per round
of the emoji table before any repeats (with a new background, scale and position).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image

from selfflow.data.benchmark.common import PALETTE, Item, Task, check_n, cycled, item_rng
from selfflow.data.benchmark.sprites import emoji_image, emoji_table, place, resize_rgba, solid
from selfflow.data.decode import parse_size, png_bytes
from selfflow.data.packaged import with_article

_NUMBER_START = ("two ", "three ", "four ", "five ", "six ", "seven ", "eight ", "nine ", "ten ")
_SINGULAR_S = ("ss", "us", "is", "ics")  # "dress", "bus", "tennis", "physics": not plurals


def is_plural(name: str) -> bool:
    """Whether a lower-case Unicode name names several things ("two hearts", "books", "paw prints")."""
    head = re.split(r" (?:with|of|on|in|for|and|without|over) ", name)[0]  # the noun the article goes with
    last = head.split()[-1]
    return name.startswith(_NUMBER_START) or (last.endswith("s") and not last.endswith(_SINGULAR_S))


def emoji_phrase(name: str) -> str:
    """A noun phrase for a lower-case Unicode name: "red apple" -> "a red apple",
    "two hearts" -> "two hearts", "face with tears of joy" -> "a face with tears of joy"."""
    return name if is_plural(name) else with_article(name)


def emoji_caption(name: str, background: str) -> str:
    return f"{emoji_phrase(name)} on {with_article(background)} background"


def render_emoji(
    codepoint: int, size: int, background: str, rng: np.random.Generator
) -> tuple[Image.Image, list[int], float]:
    """(RGB image size x size, ink box [x0, y0, x1, y1], scale) of one emoji on `background`."""
    scale = float(rng.uniform(0.5, 0.9))
    sprite = resize_rgba(emoji_image(codepoint), round(size * scale))
    x = int(rng.integers(0, size - sprite.width + 1))
    y = int(rng.integers(0, size - sprite.height + 1))
    image = place(solid((size, size), PALETTE[background]), sprite, x, y)
    return image, [x, y, x + sprite.width, y + sprite.height], round(scale, 4)


def emoji_items(args: argparse.Namespace) -> Iterator[Item]:
    """--n emoji images of --resolution (square) pixels."""
    check_n(args.n)
    height, width = parse_size(args.resolution)
    if height != width or height < 16:
        raise ValueError(f"--resolution {args.resolution}: emoji images are square and at least 16 px")
    table = emoji_table()
    for index in range(args.n):
        codepoint, name = table[cycled(args.seed, "emoji-char", index, len(table))]
        rng = item_rng(args.seed, "emoji", index)
        background = str(rng.choice(sorted(PALETTE)))
        image, box, scale = render_emoji(codepoint, height, background, rng)
        meta = {
            "codepoints": [f"U+{codepoint:04X}"],
            "char": chr(codepoint),
            "name": name,
            "background": background,
            "background_rgb": list(PALETTE[background]),
            "box": box,  # x0, y0, x1, y1 (exclusive) of the scaled emoji bitmap
            "scale": scale,
        }
        yield Item(f"emoji_{index:06d}", png_bytes(image), "png", emoji_caption(name, background), meta)


TASK = Task(
    emoji_items,
    "a Noto colour emoji on a coloured background, captioned by its Unicode name",
    {"tiny": {"n": 200, "resolution": "64"}, "full": {"n": 3_000, "resolution": "64"}},
)
