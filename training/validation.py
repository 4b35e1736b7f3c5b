"""Validation velocity loss per noise level on held-out shards (issue 7).

    report = validation_loss(ema_model, cfg, "heldout_shards/", batches=8, t_bins=5)
    report["tasks"]["image"]["loss_t0"]  # mean velocity MSE at t = 0.1 (centre of the first of 5 bins)

The loss is the plain flow-matching one of the `vanilla` objective (one level per sample, no dual
timestep, no representation loss), but with the levels fixed instead of drawn: every sample is scored at
the centre of each of `t_bins` equal-width bins of [0, 1], with one noise draw per batch reused for all
levels. Each task of the shard folder is read on its own (`DataPipeline`, `shuffle_buffer=0`, seeded) for
`batches` batches, and its noise comes from a generator seeded by (seed, task, batch index) on the CPU,
so the same model and shards give the same numbers. Keys follow the training log (`loss_t0`, ...).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfflow.configs.factory import TextConditioner, build_media_tokenizer, build_text_conditioner
from selfflow.configs.schema import Config
from selfflow.data.pipeline import DataPipeline, MediaBatch, available_tasks
from selfflow.inference.pipeline import autocast
from selfflow.models import flow
from selfflow.models.mmdit import MMDiT
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.training.objectives import velocity_mse


def bin_centres(t_bins: int) -> list[float]:
    """Centres of `t_bins` equal-width bins of [0, 1]: 5 -> [0.1, 0.3, 0.5, 0.7, 0.9]."""
    if t_bins < 1:
        raise ValueError(f"t_bins must be >= 1, got {t_bins}")
    return [(i + 0.5) / t_bins for i in range(t_bins)]


def _batch_generator(seed: int, task: str, index: int) -> torch.Generator:
    """A CPU generator for batch `index` of `task`, independent of the other tasks and batches."""
    state = np.random.SeedSequence([seed, zlib.crc32(task.encode()), index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@torch.no_grad()
def batch_losses(
    model: MMDiT,
    media: MediaTokenizer,
    encode_text: TextConditioner,
    batch: MediaBatch,
    levels: Sequence[float],
    generator: torch.Generator,
    drop_captions: bool = False,
    precision: str = "fp32",
) -> Tensor:
    """Velocity MSE of every sample at every level -> [len(levels), B], one noise draw for all levels."""
    device = next(model.parameters()).device
    x0, ids = media.encode(
        {m: x.to(device) for m, x in batch.media.items()}, batch.latents
    )  # {m: [B, L_m, C_m]}
    eps = {m: torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device) for m, x in x0.items()}
    txt, mask = encode_text(batch.captions)  # [B, Lt], [B, Lt]
    b = len(batch.captions)
    drop = torch.full((b,), drop_captions, dtype=torch.bool, device=device)  # [B]
    cond = model.condition(ids.to(device), txt, mask, drop)
    out = []
    for level in levels:
        t = torch.full((b,), float(level), device=device)  # [B]
        noised = {m: flow.interpolate(x, eps[m], t) for m, x in x0.items()}
        with autocast(device, precision):
            pred = model(noised, ids.to(device), t, None, cond=cond).velocity
        out.append(velocity_mse(pred, x0, eps).double().cpu())  # [B]
    return torch.stack(out)  # [K, B]


def _task_pipeline(cfg: Config, shards: str | Path, task: str, seed: int, batch_size: int) -> DataPipeline:
    return DataPipeline(
        shards,
        cfg.spec,
        seed=seed,
        weights={task: 1.0},
        batch_size=batch_size,
        shuffle_buffer=0,
        image_fit=cfg.data.image_fit,
        limits=cfg.data.limits,
        caption_key=cfg.data.caption_key,
        clip_window="start",  # the same window of every clip at every evaluation
    )


def validation_loss(
    model: MMDiT,
    cfg: Config,
    shards: str | Path,
    batches: int,
    t_bins: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    tasks: Sequence[str] | None = None,
    batch_size: int | None = None,
    drop_captions: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Mean velocity MSE per t-bin and overall, per task, over `batches` batches of each task in `shards`:
    {"levels": [bin centres], "tasks": {task: {"loss", "loss_t0", ..., "samples"}}, "loss": task mean}.

    `model` is the model to score (the EMA); it is put in eval mode on `device`. Tasks default to those
    with shards in the folder; the batch size to the config's (`data.batch_sizes`, else
    `train.batch_size`). Captions condition the model unless `drop_captions`."""
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    device = torch.device(device)
    model = model.to(device).eval()
    media, encode_text = build_media_tokenizer(cfg, device), build_text_conditioner(cfg.text, device)
    levels = bin_centres(t_bins)
    report: dict[str, Any] = {"levels": levels, "t_bins": t_bins, "seed": seed, "batches": batches}
    report["tasks"] = {}
    tasks = list(tasks or available_tasks(shards))
    if not tasks:
        raise FileNotFoundError(f"no shard set of any task in {shards}")
    for task in tasks:
        size = batch_size or cfg.data.batch_sizes.get(task, cfg.train.batch_size)
        pipe = _task_pipeline(cfg, shards, task, seed, size)
        scored = (next(pipe) for _ in range(batches))
        losses = [
            batch_losses(
                model,
                media,
                encode_text,
                b,
                levels,
                _batch_generator(seed, task, i),
                drop_captions,
                precision,
            )
            for i, b in enumerate(scored)
        ]
        per_bin = torch.cat(losses, dim=1).mean(dim=1).tolist()  # [K]: each bin scores the same samples
        entry = {"loss": float(np.mean(per_bin))} | {f"loss_t{i}": v for i, v in enumerate(per_bin)}
        report["tasks"][task] = entry | {"samples": sum(x.shape[1] for x in losses)}
    report["loss"] = float(np.mean([v["loss"] for v in report["tasks"].values()]))
    return report
