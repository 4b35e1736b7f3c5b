"""T2AV: clips whose sound is tied to a visible event, with the event times as ground truth.

Scenes (--scene):
  ball   a ball falls, bounces on the floor 1-4 times ("a red ball bounces three times") and every
         impact makes a thud that starts at that impact's sample. Impacts happen at frame instants,
         so the frame of each impact shows the ball on the floor, at its lowest.
  digit  a digit appears at frame k and a voice says it starting at k / fps
         ("the digit 4 appears and is spoken"): Asterisk's recorded speaker, or flite.
  mixed  both, alternating in a seeded order.
Written as mp4 (H.264 + AAC mono at --sample-rate). The json's `event_times` (seconds) lists the
impacts or the appearance, for A/V offset scoring.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from selfflow.data.avio import encode_mp4
from selfflow.data.benchmark import sound
from selfflow.data.benchmark.common import (
    NUMBER_WORDS,
    PALETTE,
    RGB,
    Item,
    Task,
    check_n,
    colour_pair,
    cycled,
    frame_count,
    item_rng,
    times_word,
)
from selfflow.data.benchmark.media import video_size
from selfflow.data.benchmark.sprites import frames_array, place, solid, text_mask, tinted
from selfflow.data.packaged import text_fonts, with_article

SCENES = ("ball", "digit", "mixed")
MAX_BOUNCES = 4
_MIN_ARC_FRAMES = 4  # the shortest flight between two impacts
_MIN_BALL_FRAMES = 12


def plan_impacts(frames: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(impact frames, flight frames after each impact) for a ball dropped at rest at t = 0.

    Every flight is a free-fall parabola under one gravity; flights shrink by a restitution factor,
    and the last one outlasts the clip (so no impact is left out of the ground truth)."""
    if frames < _MIN_BALL_FRAMES:
        raise ValueError(f"a bouncing ball needs at least {_MIN_BALL_FRAMES} frames (--duration x --fps)")
    for _ in range(1000):
        bounces = int(rng.integers(1, MAX_BOUNCES + 1))
        restitution = rng.uniform(0.7, 0.92)
        first = int(rng.integers(round(0.15 * frames), round(0.45 * frames) + 1))
        flight = int(rng.integers(_MIN_ARC_FRAMES, 2 * first + 1))  # no higher than the drop
        arcs = [max(_MIN_ARC_FRAMES, round(flight * restitution**j)) for j in range(bounces)]
        impacts = (first + np.cumsum([0, *arcs[:-1]])).tolist()
        if impacts[-1] <= frames - 4 and impacts[-1] + arcs[-1] >= frames + 2:
            return impacts, arcs
    raise ValueError(f"no bounce plan fits {frames} frames; use a longer --duration")


def heights(times: np.ndarray, impacts: list[float], arcs: list[float], gravity: float) -> np.ndarray:
    """Height of the ball's bottom above the floor at each time (s), float [T]."""
    first = impacts[0]
    height = gravity * (first**2 - np.minimum(times, first) ** 2) / 2  # the drop from rest
    for start, arc in zip(impacts, arcs, strict=True):
        inside = (times >= start) & (times < start + arc)
        height = np.where(inside, gravity * (times - start) * (start + arc - times) / 2, height)
    return height


def draw_ball(
    size: tuple[int, int], centre: tuple[float, float], radius: float, colours: tuple[RGB, RGB, RGB, int]
) -> np.ndarray:
    """An anti-aliased disc over a background with a floor band: uint8 [H, W, 3].

    colours: (ball, background, floor, first floor row)."""
    width, height = size
    ball, background, floor, floor_y = colours
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    image = np.where((ys >= floor_y)[..., None], floor, background).astype(np.float64)  # [H, W, 3]
    coverage = np.clip(radius + 0.5 - np.hypot(xs - centre[0], ys - centre[1]), 0, 1)[..., None]
    return np.round(image * (1 - coverage) + np.asarray(ball) * coverage).astype(np.uint8)


def ball_scene(
    args: argparse.Namespace, index: int, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """(frames uint8 [T, H, W, 3], audio float32 [S], caption, json) of one bouncing ball."""
    rng = item_rng(args.seed, "av-ball", index)
    width, height = size
    count = frame_count(args.duration, args.fps)
    impact_frames, arc_frames = plan_impacts(count, rng)
    impacts, arcs = [f / args.fps for f in impact_frames], [a / args.fps for a in arc_frames]
    radius = rng.uniform(0.07, 0.11) * height
    floor_y = round(0.88 * height)
    room = floor_y - 2 * radius - 2  # highest bottom-of-ball height that stays in the frame
    gravity = room * rng.uniform(0.75, 1.0) / max(impacts[0] ** 2 / 2, max(a**2 / 8 for a in arcs))
    times = np.arange(count) / args.fps  # [T]
    centre_y = floor_y - radius - heights(times, impacts, arcs, gravity)  # [T]
    x0, x1 = rng.uniform(radius + 1, width - radius - 1, 2)
    centre_x = x0 + (x1 - x0) * times / times[-1]  # [T]
    fg, bg = colour_pair(rng)
    floor_rgb = tuple(round(0.6 * c) for c in PALETTE[bg])
    colours = (PALETTE[fg], PALETTE[bg], floor_rgb, floor_y)
    frames = np.stack(
        [draw_ball(size, (x, y), radius, colours) for x, y in zip(centre_x, centre_y, strict=True)]
    )
    audio = sound.noise_floor(rng, round(count / args.fps * args.sample_rate))
    speeds = [gravity * impacts[0]] + [gravity * a / 2 for a in arcs[:-1]]  # px/s just before impact
    for time, speed in zip(impacts, speeds, strict=True):
        strength = float(np.clip(speed / max(speeds), 0.35, 1.0)) * 0.8
        sound.mix(audio, sound.impact(rng, args.sample_rate, strength), round(time * args.sample_rate))
    meta = {
        "scene": "ball",
        "bounces": len(impacts),
        "event_times": impacts,
        "event_frames": impact_frames,
        "color": fg,
        "color_rgb": list(PALETTE[fg]),
        "background": bg,
        "radius": round(radius, 3),
        "floor_y": floor_y,
        "positions": np.round(np.stack([centre_x, centre_y], axis=1), 2).tolist(),  # centre per frame
    }
    return frames, audio, f"{with_article(fg)} ball bounces {times_word(len(impacts))}", meta


def digit_scene(
    args: argparse.Namespace, index: int, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """(frames, audio, caption, json) of a digit that appears while a voice says it."""
    rng = item_rng(args.seed, "av-digit", index)
    width, height = size
    count = frame_count(args.duration, args.fps)
    digit = cycled(args.seed, "av-digit-value", index, 10)
    voice = sound.resolve_voice(args.voice)
    speech, speaker = sound.spoken(
        f"digits/{digit}", NUMBER_WORDS[digit], voice, int(rng.integers(4)), args.sample_rate
    )
    latest = int((count / args.fps - len(speech) / args.sample_rate - 0.1) * args.fps)
    earliest = max(1, round(0.15 * count))
    if latest < earliest:
        raise ValueError(f"--duration {args.duration} is too short for a spoken digit; use 2 s or more")
    appear = int(rng.integers(earliest, latest + 1))
    fonts = text_fonts()
    font_path = fonts[int(rng.integers(len(fonts)))]
    fg, bg = colour_pair(rng)
    mask = text_mask(str(digit), font_path, round(height * rng.uniform(0.55, 0.8)))
    x, y = (int(rng.integers(0, room + 1)) for room in (width - mask.width, height - mask.height))
    blank = solid(size, PALETTE[bg])
    shown = place(blank, tinted(mask, PALETTE[fg]), x, y)
    frames = frames_array([blank if i < appear else shown for i in range(count)])  # [T, H, W, 3]
    audio = sound.noise_floor(rng, round(count / args.fps * args.sample_rate))
    start = round(appear / args.fps * args.sample_rate)
    sound.mix(audio, speech * rng.uniform(0.5, 0.9), start)
    meta = {
        "scene": "digit",
        "digit": digit,
        "word": NUMBER_WORDS[digit],
        "voice": speaker,
        "font": font_path.name,
        "color": fg,
        "background": bg,
        "box": [x, y, x + mask.width, y + mask.height],
        "event_times": [appear / args.fps],
        "event_frames": [appear],
        "speech_onset": round(start / args.sample_rate, 6),
        "speech_offset": round((start + len(speech)) / args.sample_rate, 6),
    }
    return frames, audio, f"the digit {digit} appears and is spoken", meta


def av_items(args: argparse.Namespace) -> Iterator[Item]:
    """--n clips of --resolution, --fps, --duration and --sample-rate."""
    check_n(args.n)
    if args.scene not in SCENES:
        raise ValueError(f"--scene must be one of {SCENES}, not {args.scene!r}")
    height, width = video_size(args.resolution)
    if args.sample_rate < 8000:
        raise ValueError(f"--sample-rate must be at least 8000, not {args.sample_rate}")
    for index in range(args.n):
        scene = args.scene if args.scene != "mixed" else SCENES[cycled(args.seed, "av-scene", index, 2)]
        build = ball_scene if scene == "ball" else digit_scene
        frames, audio, caption, meta = build(args, index, (width, height))
        meta |= {"fps": args.fps, "frames": len(frames), "sample_rate": args.sample_rate}
        media = encode_mp4(frames, args.fps, audio[None], args.sample_rate)  # audio [S] -> [1, S]
        yield Item(f"av_{index:06d}", media, "mp4", caption, meta)


TASK = Task(
    av_items,
    "a bouncing ball with impact sounds, or a digit that appears while it is spoken (--scene, --voice)",
    {
        "tiny": {"n": 32, "resolution": "64x64", "fps": 16, "duration": 2.0, "sample_rate": 16_000},
        "full": {"n": 2_000, "resolution": "64x64", "fps": 16, "duration": 4.0, "sample_rate": 16_000},
    },
)
