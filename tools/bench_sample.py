#!/usr/bin/env python
"""Time generation: seconds per AV clip (sampling + mp4 muxing) and per image, for a snapshot or run
(default: the shipped model), plus what caching the condition-only work saves per model call.

    python tools/bench_sample.py [--ckpt DIR] [--steps 30] [--rounds 3] [--device auto]

Rounds alternate the measurements so that a shared CPU's load falls on all of them alike; the JSON
reports the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from selfflow.data.avio import encode_mp4
from selfflow.inference.pipeline import Generator, load_snapshot, pick_device, resolve_model, to_uint8

AV_PROMPT = "a red ball bounces three times"
IMAGE_PROMPT = 'a sign that says "cat"'


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def av_clip(gen: Generator, steps: int, cfg_scale: float) -> None:
    spec = gen.cfg.spec
    media = gen.generate([AV_PROMPT], [0], ("video", "audio"), steps, "euler", cfg_scale)
    frames = to_uint8(media["video"][0].permute(1, 0, 2, 3))  # [T, H, W, C]
    encode_mp4(frames, spec.fps, media["audio"][0].clamp(-1, 1).numpy(), spec.sample_rate)


def model_calls(gen: Generator, calls: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(uncached, cached): `calls` AV velocity evaluations with the caption embedded and the rotary
    tables built on every call, or once."""
    spec, model, dev = gen.cfg.spec, gen.model, gen.device
    mods = ["video", "audio"]
    media = {m: torch.randn(1, spec.tokens(m), spec.token_dim(m), device=dev) for m in mods}
    ids = gen.media.position_ids(mods).to(dev)
    txt, mask = gen.encode_text([AV_PROMPT])
    t = torch.full((1,), 0.5, device=dev)

    @torch.no_grad()
    def uncached() -> None:
        for _ in range(calls):
            model(media, ids, t, txt, txt_mask=mask)

    @torch.no_grad()
    def cached() -> None:
        cond = model.condition(ids, txt, mask)
        for _ in range(calls):
            model(media, ids, t, None, cond=cond)

    return uncached, cached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="snapshot, run or checkpoint (default: the shipped model)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--images", type=int, default=8, help="images per batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    start = time.perf_counter()
    cfg, model = load_snapshot(args.ckpt, device)
    load_s = time.perf_counter() - start
    gen = Generator(cfg, model, device)
    uncached, cached = model_calls(gen, 2 * args.steps)
    jobs = {
        "av_clip_s": lambda: av_clip(gen, args.steps, args.cfg),
        "image_batch_s": lambda: gen.generate(
            [IMAGE_PROMPT] * args.images, list(range(args.images)), ("image",), args.steps, "euler", args.cfg
        ),  # fmt: skip
        "calls_uncached_s": uncached,
        "calls_cached_s": cached,
    }
    av_clip(gen, 2, args.cfg)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            times[name].append(timed(job, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": str(resolve_model(args.ckpt)),
        "preset": cfg.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "steps": args.steps,
        "cfg": args.cfg,
        "load_s": round(load_s, 3),
        "seconds_per_av_clip": round(med["av_clip_s"], 3),
        "seconds_per_image": round(med["image_batch_s"] / args.images, 3),
        "images_per_batch": args.images,
        "model_call_ms": {
            "uncached": round(1000 * med["calls_uncached_s"] / (2 * args.steps), 3),
            "cached": round(1000 * med["calls_cached_s"] / (2 * args.steps), 3),
        },
        "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
