#!/usr/bin/env python
"""Training input throughput with codec latents stored in the shards vs decoding and encoding the
media at every batch: the same shards, side by side in one run (issue 18).

    python tools/bench_latents.py --images 16 --clips 8 --rounds 2

The codecs have the architectures people train with, randomly initialised (throughput does not depend on
the weights): a 16-channel 8x KL image autoencoder (SD-style blocks 128-256-512-512), the Wan 2.1 video
VAE (diffusers' default AutoencoderKLWan: 8x space, 4x time, causal) and a mono Oobleck audio VAE
(Stable Audio's blocks, strides 4-4-4-6-5 = 1920: 25 latents/s at 48 kHz). Images are 256 px; clips
2 s of 128 px video at 12.5 fps (25 frames -> 7 latent frames) with 48 kHz audio. make_shards --latents
writes both kinds of sample once (its time is reported too); each round then reads every sample of a
task once through the training reader, with data.latents=auto and with data.latents=never, and turns
the batch into tokens (`MediaTokenizer.encode`). One process, no workers; the report is the median
samples/s per path and task, and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfflow.configs import load_config
from selfflow.configs.factory import build_media_tokenizer
from selfflow.data.avio import encode_mp4
from selfflow.tools import make_shards
from selfflow.training.loop import build_data

PRESET = """name: bench-latents
spec: {duration: 2.0, fps: 12.5, height: 128, width: 128, sample_rate: 48000, image_height: 256,
       image_width: 256, image_latent_channels: 16, video_latent_channels: 16, audio_latent_channels: 64,
       space_stride: 8, time_stride: 4, causal_time: true, audio_stride: 1920, image_patch: 2,
       video_patch: [1, 2, 2], audio_patch: 1}
data: {shuffle_buffer: 0}
"""


def write_codecs(root: Path) -> dict[str, Path]:
    import diffusers

    torch.manual_seed(0)
    down, up = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    kl = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=down,
                                 up_block_types=up, layers_per_block=2, latent_channels=16)  # fmt: skip
    oobleck = diffusers.AutoencoderOobleck(downsampling_ratios=[4, 4, 4, 6, 5], audio_channels=1,
                                           sampling_rate=48000)  # fmt: skip
    dirs = {"image": root / "kl", "video": root / "wan", "audio": root / "oobleck"}
    for ae, folder in zip((kl, diffusers.AutoencoderKLWan(), oobleck), dirs.values(), strict=True):
        ae.save_pretrained(folder)
    return dirs


def write_media(folder: Path, images: int, clips: int) -> None:
    """Smooth random images and clips (a moving square over noise, a click per second)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        small = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((256, 256), Image.Resampling.BILINEAR).save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(f"picture {i}")
    for i in range(clips):
        video = (rng.random((25, 128, 128, 3)) * 60).astype(np.uint8)
        for t in range(25):
            video[t, 40:72, 4 * t : 4 * t + 32] = 230
        audio = (0.01 * rng.standard_normal((1, 96000))).astype(np.float32)
        audio[0, ::48000] = 0.8
        (folder / f"clip_{i:03d}.mp4").write_bytes(encode_mp4(video, 12.5, audio, 48000))
        (folder / f"clip_{i:03d}.txt").write_text(f"a square moves, clip {i}")


def read_rate(cfg_path: Path, codecs: dict[str, Path], shards: Path, task: str, mode: str, n: int) -> float:
    """Samples per second from the reader to tokens, reading `n` samples of `task` (after one batch)."""
    over = [f"codecs.{m}={p}" for m, p in codecs.items()]
    cfg = load_config(cfg_path, [*over, f"data.shards={shards}", f"data.weights={{{task}: 1}}",
                                 f"data.latents={mode}", "train.batch_size=2"])  # fmt: skip
    media, pipe = build_media_tokenizer(cfg), build_data(cfg)
    assert bool(pipe.latents) == (mode == "auto"), pipe.latents
    batch = next(pipe)
    media.encode(batch.media, batch.latents)  # warm-up, weights loaded
    batches = max(n // 2, 1)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(pipe)
        media.encode(batch.media, batch.latents)
    return batches * 2 / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()  # make_shards --latents encodes single-threaded in this process
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "preset.yaml").write_text(PRESET)
        codecs = write_codecs(root / "codecs")
        write_media(root / "media", args.images, args.clips)
        began = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            argv = ["--input", str(root / "media"), "--output", str(root / "shards"), "--quiet"]
            argv += ["--spec", str(root / "preset.yaml"), "--shard-samples", "4", "--workers", "1"]
            assert make_shards.main(argv + [a for f in codecs.values() for a in ("--latents", str(f))]) == 0
        made = time.perf_counter() - began
        torch.set_num_threads(threads)
        counts = {"image": args.images, "av": args.clips}
        rates: dict[str, list[float]] = {f"{t}/{m}": [] for t in counts for m in ("auto", "never")}
        for r in range(args.rounds):
            for name in rates if r % 2 == 0 else reversed(list(rates)):
                task, mode = name.split("/")
                rates[name].append(
                    read_rate(root / "preset.yaml", codecs, root / "shards", task, mode, counts[task])
                )
    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "samples_per_s": {k: round(v, 3) for k, v in median.items()},
        "stored_over_encoded": {t: round(median[f"{t}/auto"] / median[f"{t}/never"], 1) for t in counts},
        "make_shards_latents_s_per_sample": round(made / (args.images + args.clips), 2),
        "rounds": {k: [round(x, 3) for x in v] for k, v in rates.items()},
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
