"""What every benchmark builder shares: the item and task records, per-item seeds, named colours.

Randomness: item i of a build draws only from `item_rng(seed, task, i)`, so the first k items of a
build with --n N are the items of a build with --n k, and no item depends on another.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

SIZES = ("tiny", "full")


@dataclass(frozen=True)
class Item:
    key: str  # file stem, no dots
    media: bytes
    ext: str  # media file extension: "png", "mp4" or "flac"
    caption: str
    meta: dict  # written as <key>.json: ground truth for the metrics


@dataclass(frozen=True)
class Task:
    """A builder plus the defaults that --size picks for the options the user leaves out."""

    build: Callable[[argparse.Namespace], Iterator[Item]]
    summary: str
    presets: dict[str, dict[str, object]] = field(default_factory=dict)  # size -> {option: value}


def item_rng(seed: int, salt: str, index: int) -> np.random.Generator:
    """The generator of item `index` of a build; `salt` separates independent draws (e.g. per task)."""
    return np.random.default_rng([seed, zlib.crc32(salt.encode()), index])


def cycled(seed: int, salt: str, index: int, count: int) -> int:
    """Index into `count` choices, visiting each once per round of `count` items, in a seeded order."""
    round_, pos = divmod(index, count)
    order = np.random.default_rng([seed, zlib.crc32(salt.encode()), round_]).permutation(count)
    return int(order[pos])


# ---------------------------------------------------------------------- colours
RGB = tuple[int, int, int]
PALETTE: dict[str, RGB] = {
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "red": (210, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (250, 220, 40),
    "green": (40, 160, 60),
    "teal": (0, 128, 128),
    "blue": (40, 80, 220),
    "navy": (20, 30, 100),
    "purple": (120, 50, 170),
    "pink": (245, 150, 190),
    "brown": (120, 70, 30),
}
MIN_CONTRAST = 3.0  # WCAG ratio for large text; named pairs below it are never drawn together


def _luminance(rgb: RGB) -> float:
    """WCAG relative luminance of an sRGB colour."""
    linear = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(a: RGB, b: RGB) -> float:
    """(L_light + 0.05) / (L_dark + 0.05): 1 for equal colours, 21 for black on white."""
    la, lb = sorted((_luminance(a), _luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def colour_pair(rng: np.random.Generator, min_contrast: float = MIN_CONTRAST) -> tuple[str, str]:
    """(foreground, background) names of two palette colours at least `min_contrast` apart."""
    pairs = [
        (fg, bg)
        for fg in PALETTE
        for bg in PALETTE
        if fg != bg and contrast_ratio(PALETTE[fg], PALETTE[bg]) >= min_contrast
    ]
    return pairs[int(rng.integers(len(pairs)))]


# ---------------------------------------------------------------------- words
NUMBER_WORDS = (  # noqa: SIM905 (a word list reads best as one string)
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    " sixteen seventeen eighteen nineteen twenty"
).split()
TENS_WORDS = {30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety"}


def times_word(count: int) -> str:
    """1 -> "once", 2 -> "twice", 3 -> "three times"."""
    if count < 1:
        raise ValueError(f"times_word needs a positive count, not {count}")
    return {1: "once", 2: "twice"}.get(count, f"{NUMBER_WORDS[count]} times")


def frame_count(duration: float, fps: float) -> int:
    """Frames in a clip of `duration` seconds (at least 2), or ValueError for a bad duration or rate."""
    if fps <= 0 or duration <= 0:
        raise ValueError(f"--fps and --duration must be positive (got {fps}, {duration})")
    frames = round(duration * fps)
    if frames < 2:
        raise ValueError(f"a {duration} s clip at {fps} fps has fewer than 2 frames")
    return frames


def check_n(n: int, limit: int | None = None) -> None:
    if n < 1 or (limit is not None and n > limit):
        raise ValueError(f"--n must be between 1 and {limit}" if limit else f"--n must be positive, not {n}")
