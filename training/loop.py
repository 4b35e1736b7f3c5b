"""The training loop: `train(cfg)` reads shards, steps the objective, keeps the EMA(s), logs, writes
sample grids and checkpoints, and resumes from `<run.dir>/checkpoints/` when it can. It runs as one
process, or as each rank of several under torchrun / the deepspeed launcher (training/distributed.py,
training/fsdp.py; checkpoints in training/saving.py); a single process takes none of the multi-process
paths.

    trainer = build_trainer(cfg)          # model, projector, EMA(s), AdamW, RNG, tokenizers
    out = train_step(trainer, batch)      # one optimizer step + EMA update (training/step.py)

Precision: fp32 weights and optimizer; bf16 autocast on CUDA (`train.precision`). The EMA copies are
fp32. Counters are device tensors until a log interval (`training/tracking.py`); rank 0 writes them to
metrics.jsonl and the dashboards of `train.trackers` (`training/trackers.py`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from selfflow.configs.factory import (
    build_media_tokenizer,
    build_model,
    build_text_conditioner,
)
from selfflow.configs.schema import Config, ConfigError, TrainConfig, save_config
from selfflow.data.latents import stored_modalities
from selfflow.data.pipeline import TASK_MODALITIES, DataPipeline, MediaBatch, WorkerPipeline, available_tasks
from selfflow.inference.pipeline import Generator, image_grid, pick_device, save_image
from selfflow.inference.samplers import SamplingStopped
from selfflow.models.packing import pack_tokens
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tokenizers.spec import MODALITIES
from selfflow.training import distributed as dist_io
from selfflow.training.distributed import SINGLE, Dist, any_rank
from selfflow.training.ema import make_emas
from selfflow.training.finetune import init_from
from selfflow.training.guards import NonFiniteError, Preemption
from selfflow.training.objectives import Batch, Models, ObjectiveOutput, make_head
from selfflow.training.runlock import hold_run_dir
from selfflow.training.saving import ResumePlan, restore, resume_plan, save
from selfflow.training.state import Trainer
from selfflow.training.step import train_step
from selfflow.training.trackers import check_trackers, open_trackers
from selfflow.training.tracking import MetricMeter, RunLogger

TEACHER_OBJECTIVES = ("self_flow", "sra")
TASK_OF = {tuple(sorted(mods)): task for task, mods in TASK_MODALITIES.items()}  # modalities -> task


def _repa_encoder(cfg: Config, media: MediaTokenizer, device: torch.device) -> Any:
    if not cfg.objective.repa_encoder:
        raise ConfigError("objective.name=repa needs objective.repa_encoder (a local vision model directory)")
    from selfflow.training.encoders import build_encoder

    resolution = cfg.objective.repa_resolution or None
    return build_encoder(cfg.objective.repa_encoder, media, resolution).to(device)


def lr_factor(t: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (from 0) over train.lr: a linear warm-up over
    `warmup_steps`, then `schedule`: constant, or a cosine / linear decay to 0 at `max_steps`, over the
    last `decay_steps` steps when that is set (constant until they start)."""
    warmup = max(t.warmup_steps, 0)
    if step < warmup:
        return (step + 1) / warmup
    start = t.max_steps - t.decay_steps if t.decay_steps else warmup  # the decay's first step
    progress = min(1.0, max(0, step - start) / max(1, t.max_steps - start))
    if t.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress if t.schedule == "linear" else 1.0


def build_trainer(cfg: Config, device: str | torch.device | None = None, dist: Dist = SINGLE) -> Trainer:
    """Model (seeded by cfg.seed, the same on every rank), projector head, EMA(s), AdamW + warm-up, the
    objective's RNG (seeded per rank) and tokenizers; the engine's wrapping (DDP, FSDP2 sharding of the
    student, head and EMAs, or DeepSpeed); `train.compile` compiles each block of the student."""
    device = pick_device(cfg.train.device) if device is None else torch.device(device)
    torch.manual_seed(cfg.seed)
    media = build_media_tokenizer(cfg, device)
    student = build_model(cfg, device).train()
    name = cfg.objective.name
    encoder = _repa_encoder(cfg, media, device) if name == "repa" else None
    head = make_head(name, student.params.hidden_size, getattr(encoder, "feature_dim", 0))
    head = head.to(device) if head is not None else None
    teacher_decay = cfg.train.teacher_decay if cfg.train.teacher_decay >= 0 else None
    ema, teacher_ema = make_emas(
        student, cfg.train.ema_decay, teacher_decay, dtype=torch.float32, warmup=cfg.train.ema_warmup
    )
    if cfg.train.compile:  # the blocks' forward only: names, hooks (FSDP2) and the EMA copy stay as they are
        for block in [*student.double_blocks, *student.single_blocks]:
            block.forward = torch.compile(block.forward)
    if dist.fsdp:  # before the optimizer, which must hold the sharded parameters
        from selfflow.training.fsdp import shard_run

        shard_run(student, head, [ema, teacher_ema], device, cfg.train.precision)
    teacher = teacher_ema.model if name in TEACHER_OBJECTIVES else None
    params = list(student.parameters()) + (list(head.parameters()) if head is not None else [])
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, t))
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 1_000_003 * dist.rank)
    engine = dist_io.make_engine(cfg, dist, student, head, optimizer) if dist.deepspeed else None
    ddp = dist_io.make_ddp(student, head, device) if dist.multi and dist.engine == "ddp" else None
    return Trainer(
        cfg=cfg,
        device=device,
        models=Models(student, head, teacher, encoder),
        ema=ema,
        teacher_ema=teacher_ema,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        media=media,
        encode_text=build_text_conditioner(cfg.text, device),
        dist=dist,
        engine=engine,
        ddp=ddp,
    )


def make_batch(
    tr: Trainer,
    media: dict[str, Tensor],
    captions: list[str],
    tasks: tuple[str, ...] = (),
    latents: frozenset[str] = frozenset(),
) -> Batch:
    """Raw media {modality: [B, ...]} + captions -> the objective's Batch on the training device. With
    `tasks` (a packed MediaBatch: sample i has task i, media[m] stacks the samples that have m), the
    samples are packed into one row (models/packing.py). The modalities in `latents` are stored codec
    latents already, not encoded again."""
    on_device = {m: x.to(tr.device, non_blocking=True) for m, x in media.items()}
    tokens, ids = tr.media.encode(on_device, latents)
    txt, mask = tr.encode_text(captions)
    if not tasks:
        return Batch(tokens, ids.to(tr.device), txt, mask, task=TASK_OF[tuple(sorted(media))])
    per_modality = {m: tr.media.position_ids([m]) for m in tokens}
    modalities = [TASK_MODALITIES[t] for t in tasks]
    row, row_ids, row_txt, row_mask, packed = pack_tokens(tokens, per_modality, modalities, txt, mask)
    return Batch(row, row_ids, row_txt, row_mask, task="packed", packed=packed, sample_tasks=tasks)


# ---------------------------------------------------------------- the loop


# data.* keys that DataPipeline takes as they are
_READER_OPTIONS = ("shuffle_buffer", "strict", "image_fit", "limits", "allow_changed_shards", "task_shards")
_READER_OPTIONS += ("caption_key", "clip_window", "open_retries", "retry_wait_s")


def build_data(cfg: Config, dist: Dist = SINGLE) -> DataPipeline | WorkerPipeline:
    """The mixed-task pipeline of `data.*`, in this process or over `data.num_workers` processes; with
    several ranks each reads its own shards (every world-th one of each epoch's shard order)."""
    d = cfg.data
    kwargs = dict(
        shards=d.shards,
        spec=cfg.spec,
        seed=cfg.seed,
        rank=dist.rank,
        world=dist.world,
        weights=d.weights,
        batch_sizes=d.batch_sizes,
        batch_size=cfg.train.batch_size,
    )
    kwargs |= {name: getattr(d, name) for name in _READER_OPTIONS}
    if d.latents == "auto":  # read the codec latents the shards store, where they are the run's codec's
        tasks = [t for t, w in d.weights.items() if w > 0] or available_tasks(d.shards, d.task_shards)
        codecs = {m: getattr(cfg.codecs, m) for m in MODALITIES}
        kwargs["latents"] = stored_modalities(d.shards, d.task_shards, tasks, codecs, cfg.spec)
    if d.pack:  # one row of samples of any task per batch, up to the token budget
        kwargs |= dict(tokens_per_batch=d.tokens_per_batch, text_tokens=cfg.text.max_len)
    if d.num_workers > 0:
        return WorkerPipeline(kwargs, d.num_workers, timeout=d.worker_timeout_s)
    return DataPipeline(**kwargs)


def data_stream(tr: Trainer, data: DataPipeline | WorkerPipeline) -> Iterator[tuple[Batch, MediaBatch]]:
    """Endless (batch, the pipeline's batch: captions, sample keys, skipped samples) from the mixed-task
    pipeline."""
    for item in data:
        tr.skipped = data.skipped_count
        yield make_batch(tr, item.media, item.captions, item.tasks, item.latents), item


def step_batches(
    tr: Trainer, data: DataPipeline | WorkerPipeline, grad_accum: int
) -> Iterator[tuple[list[Batch], list[MediaBatch]]]:
    """The micro-batches of each optimizer step (`train.grad_accum` consecutive batches) and what the
    pipeline said of them (captions, keys, skipped samples)."""
    stream = data_stream(tr, data)
    while True:
        group = list(itertools.islice(stream, grad_accum))
        if len(group) < grad_accum:
            return
        yield [b for b, _ in group], [item for _, item in group]


def _grid_task(batch: Batch) -> str:
    """The task the sample grids show: the batch's, or a packed batch's first one that has pictures."""
    tasks = batch.sample_tasks or (batch.task,)
    return next((t for t in tasks if t != "audio"), tasks[0])


def _draw_grid(
    tr: Trainer, sampler: Generator, prompts: list[str], task: str, stop: Preemption, logger: RunLogger
) -> None:
    """Rank 0 writes a grid of samples. Under FSDP2 the EMA forward is collective, so every rank draws it
    (and the grid is not abandoned on a preemption signal, which may have reached one rank only). A codec
    folder without weights (a run on stored latents) cannot decode: the grid is skipped and logged."""
    main, sharded = tr.dist.is_main, tr.dist.fsdp and tr.dist.multi
    if not (main or sharded):
        return
    blind = [m for m in TASK_MODALITIES[task] if not getattr(tr.media.codec(m), "has_weights", True)]
    if blind:
        reason = f"codecs.{blind[0]} has only a config.json: decoding samples needs the autoencoder's weights"
        logger.log(tr.step, {"event": "sample_grid_skipped", "reason": reason})
        return
    grid = Path(tr.cfg.run.dir) / "samples" / f"step_{tr.step:08d}.png" if main else None
    should_stop = None if sharded else lambda: stop.requested is not None
    write_samples(tr, sampler, prompts, task, grid, should_stop)


def check_nonfinite(tr: Trainer, out: ObjectiveOutput, keys: list[str], logger: RunLogger) -> None:
    """After a skipped (non-finite) step: log it with the batch's keys; abort after too many in a row."""
    loss, norm = out.loss.mean().item(), out.metrics["grad_norm"].item()
    event = {"event": "nonfinite_step", "loss": str(loss), "grad_norm": str(norm), "keys": keys}
    logger.log(tr.step, {**event, "streak": tr.nonfinite_streak, "nonfinite_steps": tr.nonfinite})
    if tr.nonfinite_streak >= tr.cfg.train.max_nonfinite:
        raise NonFiniteError(
            f"{tr.nonfinite_streak} consecutive steps with a non-finite loss or gradient (last at step "
            f"{tr.step}, loss {loss}, grad norm {norm}, batch {keys[:4]}); none of them was applied"
        )


def write_samples(
    tr: Trainer,
    gen: Generator,
    prompts: list[str],
    task: str,
    path: Path | None,
    should_stop: Callable[[], bool] | None = None,
) -> Path | None:
    """A grid from the EMA model for the task of the first batch: `sample.num` images, or one row of
    frames per clip for video / AV (audio-only runs draw nothing). Prompts cycle; seeds sample.seed + i.
    `should_stop` is asked before every model forward: when it says yes (a preemption signal) the grid
    is abandoned within one forward and nothing is written (None), so the run can save and exit. With
    `path` None the grid is drawn (a collective forward under FSDP2) and not written."""
    s = tr.cfg.sample
    mods = TASK_MODALITIES[task]
    if mods == ("audio",):
        return None
    chosen = [prompts[i % len(prompts)] for i in range(s.num)]
    seeds = [s.seed + i for i in range(s.num)]
    try:
        media = gen.generate(
            chosen,
            seeds,
            mods,
            s.steps,
            s.sampler,
            s.cfg_scale,
            s.shift,
            tuple(s.guidance_interval),
            should_stop=should_stop,
        )
    except SamplingStopped:
        return None
    if path is None:
        return None
    if "image" in media:
        nrow = min(len(prompts), s.num) if len(prompts) <= 8 else 0
        return save_image(image_grid(media["image"], nrow), path)
    video = media["video"]  # [N, C, T, H, W]
    return save_image(image_grid(video.transpose(1, 2).flatten(0, 1), nrow=video.shape[2]), path)


def _log_interval(tr: Trainer, meter: MetricMeter, logger: RunLogger, bar: tqdm) -> dict[str, Any]:
    last = meter.flush() if meter.steps else {}  # an interval of skipped steps has no means
    last |= {"lr": tr.scheduler.get_last_lr()[0], "samples_seen": tr.samples_seen}
    last |= {f"samples_seen_{task}": n for task, n in sorted(tr.task_samples.items())}
    last |= {"skipped_samples": tr.skipped, "nonfinite_steps": tr.nonfinite}
    logger.log(tr.step, last)
    bar.set_postfix(loss=f"{last.get('loss', math.nan):.4f}", cos=f"{last.get('rep_cos', math.nan):.3f}")
    return last


def _stop_signal(tr: Trainer, stop: Preemption) -> str | None:
    """The preemption signal if any rank received one (all ranks then save and stop at this step)."""
    if not tr.dist.multi:
        return stop.requested
    if any_rank(tr.dist, stop.requested is not None, tr.device):
        return stop.requested or "signal on another rank"
    return None


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Train to `train.max_steps`, resuming from the latest complete checkpoint under `run.dir`, which
    the run locks (RunLocked when another job holds it). A preemption signal (`train.preempt_signals`)
    saves at the next step boundary and returns. Under torchrun / the deepspeed launcher every rank runs
    this; rank 0 locks, logs, draws samples and prints."""
    if not cfg.data.shards and not cfg.data.task_shards:
        raise ConfigError(
            "data.shards is empty: build shards with tools/make_shards.py, then data.shards=DIR"
        )
    check_trackers(cfg.train.trackers)  # every rank: a missing package fails here, not after the first steps
    dist, device = dist_io.init_dist(cfg, pick_device(cfg.train.device))
    try:
        with hold_run_dir(cfg.run.dir, dist, device):  # before anything under run.dir is touched
            plan = resume_plan(cfg, dist)
            summary = _train(build_trainer(cfg, device, dist), plan, progress and dist.is_main)
            dist_io.barrier(dist)  # no rank tears the group down while another still talks to it
        return summary
    finally:
        dist_io.shutdown(dist)


def _train(tr: Trainer, plan: ResumePlan, progress: bool) -> dict[str, Any]:
    cfg, run_dir, main = tr.cfg, Path(tr.cfg.run.dir), tr.dist.is_main
    tr.data = build_data(cfg, tr.dist)
    started_from, events = None, plan.events()
    if tr.data.latents:  # these modalities are read from the shards' latents, never encoded
        events.append({"event": "stored_latents", "modalities": sorted(tr.data.latents)})
    if plan.ckpt is not None:
        events += restore(tr, plan.ckpt)
    elif cfg.train.init_from:  # a fresh run that starts from trained weights
        started_from = init_from(tr, cfg.train.init_from)
    if main:
        save_config(cfg, run_dir / "config.yaml")
    summary = {"run_dir": str(run_dir), "step": tr.step, "checkpoint": str(plan.ckpt), "preempted": None}
    if tr.step >= cfg.train.max_steps:
        return {**summary, "last": {"step": tr.step}}
    meter = MetricMeter(cfg.train.t_bins, tr.device)
    sampler = Generator(cfg, tr.ema.model, tr.device, cfg.train.precision, tr.media, tr.encode_text)
    prompts: list[str] = list(cfg.sample.prompts)
    last, grid_task = {"step": tr.step}, None
    bar = tqdm(total=cfg.train.max_steps, initial=tr.step, disable=not progress, desc=cfg.objective.name)
    logger = RunLogger(run_dir, tr.step, open_trackers(cfg, tr.step)) if main else dist_io.QuietLogger()
    with Preemption(cfg.train.preempt_signals) as stop, logger, bar:  # closes the trackers whatever happens
        for event in events:
            logger.log(tr.step, event)
        if started_from is not None:
            logger.log(tr.step, {"event": "init_from", "source": started_from})
        for micro, items in step_batches(tr, tr.data, cfg.train.grad_accum):
            batch, keys = micro[0], [key for item in items for key in item.keys]
            prompts = prompts or sorted(set(items[0].captions))
            grid_task = grid_task or _grid_task(batch)
            out = train_step(tr, micro if len(micro) > 1 else batch)
            for where, reason in [s for item in items for s in item.skipped]:  # met while reading the step
                logger.log(tr.step, {"event": "skipped_sample", "sample": where, "reason": reason})
            if tr.nonfinite_streak:
                check_nonfinite(tr, out, keys, logger)
            else:
                tokens = sum(b.tokens for b in micro) / sum(b.samples for b in micro)
                meter.add(out.metrics, out.levels[:, 0], out.loss_gen, tokens)
            bar.update(1)
            done = tr.step >= cfg.train.max_steps
            if tr.step % cfg.train.log_every == 0 or done:
                last = _log_interval(tr, meter, logger, bar)
            if (cfg.sample.every and tr.step % cfg.sample.every == 0) or done:
                _draw_grid(tr, sampler, prompts, grid_task, stop, logger)
            stopping = _stop_signal(tr, stop)
            if tr.step % cfg.train.ckpt_every == 0 or done or stopping:
                summary["checkpoint"] = str(save(tr, run_dir))
            if stopping:
                logger.log(tr.step, {"event": "preempted", "signal": stopping})
                summary["preempted"] = stopping
                break
            if done:
                break
    return {**summary, "step": tr.step, "last": {"step": tr.step, **last}}
