"""A model against the offline benchmark, per task: build held-out real items at the model's clip spec,
sample from their captions, and score both sides with the same metric, so each number has its real
reference beside it.

    report = evaluate_task(gen, "av", n=32)               # the paper's protocol (metrics/protocol.py)
    report = evaluate_task(gen, "av", n=32, protocol=Protocol(steps=30, cfg_scale=3.0))

Tasks and metrics:
  class  Fashion-MNIST test items: KID and FID (Inception) of samples vs real, next to a second real
         set (the train split) vs the same real set, the floor at this n
  text   signs at the spec's image size: OCR word accuracy and CER of samples and of the real renders
  video  moving objects: optical-flow warping error and its frame-shuffled control, samples and real
  av     bouncing balls with impact sounds: A/V offset (median, fraction within one frame), the share of
         clips whose number of visible bounces matches the caption, and warping error, samples and real

With `codec=True` a third side, "codec", scores the real items after one encode / decode round trip
through the model's codecs: the best the transformer could reach with these codecs (a reconstruction
score, like rFID), so a low sample score can be put on the codec or on the transformer.

References are built with `seed` (default 1), which the shipped model's training data (seed 0) did not
use; class items come from the test split. Real media go through the training reader's decoding
(`decode_sample`, with the config's `data.image_fit`), so both sides have the same geometry.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from selfflow.configs.schema import Config
from selfflow.data.benchmark.common import Item
from selfflow.data.benchmark.registry import TASKS as BENCHMARK_TASKS
from selfflow.data.benchmark.registry import parse_args as benchmark_args
from selfflow.data.streams import decode_sample
from selfflow.inference.pipeline import Generator, to_uint8
from selfflow.metrics import avsync, fid, ocr, temporal
from selfflow.metrics.protocol import EVAL_TASKS, PAPER, Protocol

TASKS = EVAL_TASKS
PIPELINE_TASK = {"class": "image", "text": "image", "video": "video", "av": "av"}
MODALITIES = {"class": ("image",), "text": ("image",), "video": ("video",), "av": ("video", "audio")}


def reference_items(task: str, n: int, seed: int, cfg: Config, split: str = "test") -> list[Item]:
    """n benchmark items of `task` at the model's clip spec (`cfg.spec`)."""
    spec = cfg.spec
    clip = ["--fps", str(round(spec.fps)), "--duration", str(spec.duration)]
    extra = {
        "class": ["--split", split],
        "text": ["--resolution", f"{spec.image_height}x{spec.image_width}"],
        "video": ["--source", "mixed", "--resolution", f"{spec.height}x{spec.width}", *clip],
        "av": ["--scene", "ball", "--resolution", f"{spec.height}x{spec.width}", *clip,
               "--sample-rate", str(spec.sample_rate)],
    }[task]  # fmt: skip
    args = benchmark_args(["--task", task, "--n", str(n), "--seed", str(seed), "--out", "-", *extra])
    return list(BENCHMARK_TASKS[task].build(args))


def decode_items(items: list[Item], task: str, cfg: Config) -> dict[str, torch.Tensor]:
    """Items -> {modality: [N, ...]} in [-1, 1], decoded exactly as the training reader does."""
    kind = PIPELINE_TASK[task]
    samples = [
        decode_sample(
            {"__key__": it.key, it.ext: it.media, "txt": it.caption.encode()},
            kind,
            cfg.spec,
            cfg.data.image_fit,
        )  # fmt: skip
        for it in items
    ]
    return {m: torch.from_numpy(np.stack([s.media[m] for s in samples])) for m in samples[0].media}


def generate(gen: Generator, captions: list[str], task: str, protocol: Protocol, batch: int) -> dict:
    """Samples for `captions`, seed i for caption i, in batches, with the `protocol`'s sampler settings
    (its shift resolved against the model's)."""
    pr = protocol.resolve(gen.cfg.sample.shift)
    parts: list[dict[str, torch.Tensor]] = []
    for first in range(0, len(captions), batch):
        chunk = captions[first : first + batch]
        seeds = list(range(first, first + len(chunk)))
        media = gen.generate(
            chunk, seeds, MODALITIES[task], pr.steps, pr.sampler, pr.cfg_scale, pr.shift, pr.guidance_interval
        )
        parts.append(media)
    return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}


def frames(video: torch.Tensor) -> list[np.ndarray]:
    """[N, C, T, H, W] in [-1, 1] -> N uint8 arrays [T, H, W, 3]."""
    return [to_uint8(v.transpose(0, 1)) for v in video]


def _score(task: str, media: dict[str, torch.Tensor], items: list[Item], fps: float, rate: int) -> dict:
    """The task's metrics of one side (samples or real), given the reference items' ground truth."""
    if task == "text":
        return ocr.ocr_scores(list(to_uint8(media["image"])), [it.meta["word"] for it in items])
    clips = frames(media["video"])
    report: dict[str, Any] = {"temporal": temporal.temporal_report(clips)}
    if task == "av":
        audio = [a.numpy() for a in media["audio"]]
        report["sync"] = avsync.sync_report(
            avsync.AVClip(v, a, fps, rate, "ball") for v, a in zip(clips, audio, strict=True)
        )
        counted = [len(avsync.visual_events(v, fps, "ball")) for v in clips]
        wanted = [len(it.meta["event_times"]) for it in items]
        report["bounce_count_accuracy"] = float(
            np.mean([c == w for c, w in zip(counted, wanted, strict=True)])
        )
    return report


@torch.no_grad()
def reconstruct(gen: Generator, media: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """{modality: [N, ...]} -> the same after the model's codecs encode and decode it (in batches)."""
    n = next(iter(media.values())).shape[0]
    parts = []
    for first in range(0, n, batch):
        chunk = {m: x[first : first + batch].to(gen.device) for m, x in media.items()}
        tokens, _ = gen.media.encode(chunk)
        parts.append({m: x.float().cpu() for m, x in gen.media.decode(tokens).items()})
    return {m: torch.cat([p[m] for p in parts]) for m in media}


def evaluate_task(
    gen: Generator,
    task: str,
    n: int,
    protocol: Protocol = PAPER,
    seed: int = 1,
    batch: int = 8,
    codec: bool = False,
) -> dict[str, Any]:
    """{"samples": metrics, "real": metrics[, "codec": metrics]} (class: KID / FID of each against one
    real set)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    items = reference_items(task, n, seed, gen.cfg)
    real = decode_items(items, task, gen.cfg)
    sides = {"samples": generate(gen, [it.caption for it in items], task, protocol, batch)}
    if task != "class":
        sides["real"] = real
        if codec:
            sides["codec"] = reconstruct(gen, real, batch)
        spec = gen.cfg.spec
        return {side: _score(task, media, items, spec.fps, spec.sample_rate) for side, media in sides.items()}
    sides["real"] = decode_items(reference_items(task, n, seed, gen.cfg, split="train"), task, gen.cfg)
    if codec:  # the codec's reconstructions of the same second real set
        sides["codec"] = reconstruct(gen, sides["real"], batch)
    ref = fid.inception_features(real["image"])  # [n, 2048]
    out = {}
    for side, media in sides.items():
        feats = fid.inception_features(media["image"])
        kid_mean, kid_std = fid.kid(feats, ref, subsets=50, subset_size=n, seed=seed)
        out[side] = {"kid": kid_mean, "kid_std": kid_std, "fid": fid.fid(feats, ref), "n": n}
    return out
