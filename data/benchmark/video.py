"""T2V: one object moving across a plain background: "a sneaker moves to the left", "an ankle boot bounces".

Objects (--source): Fashion-MNIST items (tinted, their grey level as opacity), digits drawn with
a packaged font, Noto emoji, or a mix. Motions: eight straight directions at constant speed, or
bouncing off the frame's edges. Frame i shows the state at t = i / fps, drawn at sub-pixel
positions; the json holds the object, the motion and the object's centre in every frame.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator

import numpy as np
from PIL import Image

from selfflow.data.avio import encode_mp4
from selfflow.data.benchmark.common import (
    PALETTE,
    RGB,
    Item,
    Task,
    check_n,
    colour_pair,
    cycled,
    frame_count,
    item_rng,
)
from selfflow.data.benchmark.emoji import emoji_phrase, is_plural
from selfflow.data.benchmark.media import video_size
from selfflow.data.benchmark.sprites import (
    emoji_image,
    emoji_table,
    frames_array,
    place,
    resize_rgba,
    solid,
    text_mask,
    tinted,
)
from selfflow.data.packaged import FASHION_MNIST_CLASSES, load_fashion_mnist, text_fonts, with_article

SOURCES = ("fashion-mnist", "digit", "emoji", "mixed")
MOTIONS = {  # name -> (x step, y step) in image axes (y points down), caption verb (plural form)
    "left": ((-1, 0), "move to the left"),
    "right": ((1, 0), "move to the right"),
    "up": ((0, -1), "move up"),
    "down": ((0, 1), "move down"),
    "up-left": ((-1, -1), "move up and to the left"),
    "up-right": ((1, -1), "move up and to the right"),
    "down-left": ((-1, 1), "move down and to the left"),
    "down-right": ((1, 1), "move down and to the right"),
    "bounce": ((0, 0), "bounce"),
}
OBJECT_FRACTION = 0.44  # longest sprite side / shortest frame side (28 px in a 64 px frame)


@functools.lru_cache(maxsize=2)
def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist(split)


def make_sprite(
    source: str, index: int, args: argparse.Namespace, size: int, rgb: RGB
) -> tuple[Image.Image, str, dict]:
    """(RGBA sprite with longest side `size`, noun phrase for the caption, json fields) of one object."""
    rng = item_rng(args.seed, "video-object", index)
    if source == "fashion-mnist":
        images, labels = _fashion(args.split)  # [N, 28, 28], [N]
        label = cycled(args.seed, "video-class", index, len(FASHION_MNIST_CLASSES))
        pick = int(rng.choice(np.flatnonzero(labels == label)))
        mask = Image.fromarray(images[pick])
        sprite = resize_rgba(tinted(mask.crop(mask.getbbox()), rgb), size)
        name = FASHION_MNIST_CLASSES[label]
        return (
            sprite,
            with_article(name),
            {"object": name, "label": label, "split": args.split, "index": pick},
        )
    if source == "digit":
        digit = cycled(args.seed, "video-digit", index, 10)
        fonts = text_fonts()
        font_path = fonts[int(rng.integers(len(fonts)))]
        sprite = resize_rgba(tinted(text_mask(str(digit), font_path, 4 * size), rgb), size)
        return (
            sprite,
            f"the digit {digit}",
            {"object": f"digit {digit}", "digit": digit, "font": font_path.name},
        )
    table = emoji_table()
    codepoint, name = table[cycled(args.seed, "video-emoji", index, len(table))]
    sprite = resize_rgba(emoji_image(codepoint), size)
    meta = {"object": name, "codepoints": [f"U+{codepoint:04X}"], "plural": is_plural(name)}
    return sprite, emoji_phrase(name), meta


def caption_of(phrase: str, motion: str, plural: bool = False) -> str:
    """ "a sneaker" + "left" -> "a sneaker moves to the left" ("linked paperclips move ...")."""
    verb, _, rest = MOTIONS[motion][1].partition(" ")
    return " ".join(filter(None, (phrase, verb if plural else f"{verb}s", rest)))


def _fold(z: np.ndarray, length: float) -> np.ndarray:
    """Unbounded coordinate -> position bouncing between 0 and length (a triangle wave)."""
    if length <= 0:
        return np.zeros_like(z)
    return length - np.abs(np.mod(z, 2 * length) - length)


def _bounce(free: np.ndarray, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Straight flight at 1-1.6 frame widths per second, reflected at the edges, hitting one at least once."""
    for _ in range(100):
        angle = rng.uniform(0, 2 * np.pi)
        velocity = rng.uniform(1.0, 1.6) * free.mean() * np.array([np.cos(angle), np.sin(angle)])  # px/s
        start = rng.uniform(0, 1, 2) * free
        unfolded = start + times[:, None] * velocity  # [T, 2]
        ends = unfolded[[0, -1]] // np.maximum(free, 1e-9)  # [2, 2] which fold each end lies in
        if np.any(ends[0] != ends[1]):
            break
    return np.stack([_fold(unfolded[:, a], free[a]) for a in range(2)], axis=1)


def trajectory(
    motion: str, free: tuple[float, float], times: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Top-left corner of the sprite per frame, float [T, 2] (x, y) within [0, free_x] x [0, free_y]."""
    free_arr = np.asarray(free, dtype=np.float64)  # [2] room to move along x and y
    if motion == "bounce":
        return _bounce(free_arr, times, rng)
    step = np.asarray(MOTIONS[motion][0], dtype=np.float64)  # [2]
    span = rng.uniform(0.6, 1.0) * free_arr  # distance covered along each moving axis
    low = rng.uniform(0, 1, 2) * (free_arr - span)
    progress = times / times[-1]  # [T] 0 -> 1
    moving = np.where(step > 0, low + span * progress[:, None], low + span * (1 - progress[:, None]))
    still = rng.uniform(0, 1, 2) * free_arr
    return np.where(step != 0, moving, still)


def video_items(args: argparse.Namespace) -> Iterator[Item]:
    """--n clips of --resolution at --fps for --duration seconds."""
    check_n(args.n)
    if args.source not in SOURCES:
        raise ValueError(f"--source for task video must be one of {SOURCES}, not {args.source!r}")
    height, width = video_size(args.resolution)
    count = frame_count(args.duration, args.fps)
    times = np.arange(count) / args.fps  # [T] frame i shows the state at i / fps
    size = round(OBJECT_FRACTION * min(height, width))
    motions = tuple(MOTIONS)
    for index in range(args.n):
        rng = item_rng(args.seed, "video", index)
        source = args.source if args.source != "mixed" else SOURCES[cycled(args.seed, "video-src", index, 3)]
        fg, bg = colour_pair(rng)
        sprite, phrase, meta = make_sprite(source, index, args, size, PALETTE[fg])
        motion = motions[cycled(args.seed, "video-motion", index, len(motions))]
        corners = trajectory(motion, (width - sprite.width, height - sprite.height), times, rng)  # [T, 2]
        background = solid((width, height), PALETTE[bg])
        frames = frames_array([place(background, sprite, x, y) for x, y in corners])  # [T, H, W, 3]
        centres = corners + np.array(sprite.size) / 2  # [T, 2]
        meta |= {
            "source": source,
            "motion": motion,
            "color": fg if source != "emoji" else None,
            "background": bg,
            "background_rgb": list(PALETTE[bg]),
            "sprite_size": list(sprite.size),  # width, height
            "positions": np.round(centres, 2).tolist(),  # object centre (x, y) per frame, pixels
            "fps": args.fps,
            "frames": count,
        }
        caption = caption_of(phrase, motion, meta.pop("plural", False))
        yield Item(f"video_{index:06d}", encode_mp4(frames, args.fps), "mp4", caption, meta)


TASK = Task(
    video_items,
    "a Fashion-MNIST item, digit or emoji moving or bouncing (--source, --fps, --duration)",
    {
        "tiny": {"n": 32, "resolution": "64x64", "fps": 16, "duration": 2.0},
        "full": {"n": 2_000, "resolution": "64x64", "fps": 16, "duration": 4.0},
    },
)
