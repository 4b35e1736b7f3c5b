"""Score one checkpoint of a convergence-benchmark run (tools/benchmark.py) with the offline metrics.

    refs = References(settings, cache_dir)           # real items and their features, built once
    row = evaluate_checkpoint(ckpt, settings, refs)  # {"kid", "kid_std", "fid", "kid_rand", ...}

The class task is scored as `selfflow.metrics.suite.evaluate_task` does it (same reference items: the
Fashion-MNIST test split at benchmark seed `seed`, decoded like the training reader; samples from their
captions with seed i for item i; KID over 50 subsets of n), built from the suite's own pieces so that
the real side is computed once per benchmark instead of once per checkpoint, and so that the same
samples are also scored in a second feature space (`selfflow.metrics.random_cnn`): the Inception
network is REPA's target when `objective.repa_encoder=inception`. Optional: the validation velocity
loss on held-out shards (`training/validation.py`) and linear / k-NN probe accuracy of the hidden states
(`metrics/probe.py`, at t = 0, null caption, best block).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfflow.configs.schema import Config
from selfflow.inference.pipeline import Generator, load_snapshot
from selfflow.metrics import fid, suite
from selfflow.metrics.probe import probe_report
from selfflow.metrics.protocol import PAPER, Protocol
from selfflow.metrics.random_cnn import random_cnn_features
from selfflow.training.validation import validation_loss

KID_SUBSETS = 50  # as evaluate_task


@dataclass(frozen=True)
class EvalSettings:
    """What every checkpoint is scored with; a run's stored evaluations are valid only for equal settings."""

    n: int = 64  # class items: samples and real images per KID / FID
    protocol: Protocol = PAPER  # sampler settings of the samples (metrics/protocol.py)
    seed: int = 1  # benchmark seed of the reference items (training data uses seed 0)
    batch: int = 8  # samples per generation batch
    probe: int = 0  # probe test images (2x as many train images); 0: no probe
    val_shards: str = ""  # held-out shards for the validation loss; "": none
    val_batches: int = 4

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"protocol": self.protocol.record()}


@dataclass
class RealSet:
    """The reference items of one clip spec: captions, features of the test items, and the floor (a
    second real set, the train split, scored against them)."""

    captions: list[str]
    inception: np.ndarray  # [n, 2048]
    random: np.ndarray  # [n, 1152]
    floor: dict[str, float]


class References:
    """Real-side features, built on first use for each (spec, image fit) and kept; Inception features
    are also cached on disk under `cache_dir`."""

    def __init__(self, settings: EvalSettings, cache_dir: Path, device: torch.device) -> None:
        self.settings, self.cache_dir, self.device = settings, cache_dir, device
        self._sets: dict[str, RealSet] = {}

    def floor(self) -> dict[str, float]:
        """The real-vs-real scores of the first reference set built ({} before any)."""
        return next(iter(self._sets.values())).floor if self._sets else {}

    def get(self, cfg: Config) -> RealSet:
        spec, fit = cfg.spec, cfg.data.image_fit
        key = f"{spec.image_height}x{spec.image_width}-{fit}-n{self.settings.n}-seed{self.settings.seed}"
        if key not in self._sets:
            self._sets[key] = self._build(cfg, key)
        return self._sets[key]

    def _images(self, cfg: Config, split: str) -> tuple[list[str], torch.Tensor]:
        s = self.settings
        items = suite.reference_items("class", s.n, s.seed, cfg, split=split)
        images = suite.decode_items(items, "class", cfg)["image"]
        return [it.caption for it in items], images

    def _build(self, cfg: Config, key: str) -> RealSet:
        captions, test = self._images(cfg, "test")
        images = {"test": test, "train": self._images(cfg, "train")[1]}  # {split: [n, C, H, W]}
        inception = {
            split: fid.cached_features(
                f"benchmark-class-{split}-{key}", lambda x=x: x, self.cache_dir, device=self.device
            )
            for split, x in images.items()
        }  # {split: [n, 2048]}
        random = {split: random_cnn_features(x, device=self.device) for split, x in images.items()}
        floor = scores(inception["train"], random["train"], inception["test"], random["test"], self.settings)
        return RealSet(captions, inception["test"], random["test"], floor)


def scores(
    inception: np.ndarray,
    random: np.ndarray,
    ref_inception: np.ndarray,
    ref_random: np.ndarray,
    s: EvalSettings,
) -> dict[str, float]:
    """KID (mean, std over subsets) and FID in both feature spaces of one image set against the reference."""
    kid_mean, kid_std = fid.kid(inception, ref_inception, KID_SUBSETS, s.n, s.seed)
    rand_mean, rand_std = fid.kid(random, ref_random, KID_SUBSETS, s.n, s.seed)
    return {
        "kid": kid_mean,
        "kid_std": kid_std,
        "fid": fid.fid(inception, ref_inception),
        "kid_rand": rand_mean,
        "kid_rand_std": rand_std,
        "fid_rand": fid.fid(random, ref_random),
    }


def _probe(model: torch.nn.Module, cfg: Any, n_test: int, device: torch.device) -> dict[str, float]:
    """Best block's linear-probe and k-NN accuracy at t = 0 (null caption)."""
    report = probe_report(model, cfg, n_train=2 * n_test, n_test=n_test, levels=(0.0,), device=device)
    blocks = report["levels"][0.0]
    return {
        "probe_linear": max(b["linear"] for b in blocks.values()),
        "probe_knn": max(b["knn"] for b in blocks.values()),
    }


def evaluate_checkpoint(
    ckpt: Path, settings: EvalSettings, refs: References, device: torch.device
) -> dict[str, float | None]:
    """The metrics of one checkpoint's EMA model; NaN / inf become None."""
    start = time.perf_counter()
    cfg, model = load_snapshot(ckpt, device)
    gen = Generator(cfg, model, device)
    real = refs.get(cfg)
    samples = suite.generate(gen, real.captions, "class", settings.protocol, settings.batch)["image"]
    # samples: [n, C, H, W] in [-1, 1]
    inception = fid.inception_features(samples, device=device)  # [n, 2048]
    random = random_cnn_features(samples, device=device)  # [n, 1152]
    row: dict[str, float | None] = dict(scores(inception, random, real.inception, real.random, settings))
    if settings.val_shards:
        val = validation_loss(model, cfg, settings.val_shards, settings.val_batches, device=device)
        row["val_loss"] = val["loss"]
    if settings.probe:
        row |= _probe(model, cfg, settings.probe, device)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in row.items()}
