"""The training loop: `train(cfg)` reads shards, steps the objective, keeps the EMA(s), logs, writes
sample grids and checkpoints, and resumes from `<run.dir>/checkpoints/` when it can. It runs as one
process, or as each rank of several under torchrun / the deepspeed launcher (training/distributed.py;
checkpoints in training/saving.py); a single process takes none of the multi-process paths.

    trainer = build_trainer(cfg)          # model, projector, EMA(s), AdamW, RNG, tokenizers
    out = train_step(trainer, batch)      # one optimizer step + EMA update; metrics stay on device

Precision: fp32 weights and optimizer; bf16 autocast on CUDA (`train.precision`). The EMA copies are
fp32. Counters are device tensors until a log interval (`training/tracking.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from selfflow.configs.schema import Config, ConfigError, TrainConfig, save_config
from selfflow.data.pipeline import TASK_MODALITIES, DataPipeline, MediaBatch, WorkerPipeline
from selfflow.inference.pipeline import Generator, autocast, image_grid, pick_device, save_image
from selfflow.inference.samplers import SamplingStopped
from selfflow.models.factory import (
    TextConditioner,
    build_media_tokenizer,
    build_model,
    build_text_conditioner,
)
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.training import distributed as dist_io
from selfflow.training.distributed import SINGLE, Dist, any_rank, full_parameters
from selfflow.training.ema import EMA, make_emas, update_all
from selfflow.training.finetune import init_from
from selfflow.training.guards import NonFiniteError, Preemption
from selfflow.training.objectives import OBJECTIVES, Batch, Models, ObjectiveOutput, make_head
from selfflow.training.runlock import hold_run_dir
from selfflow.training.saving import ResumePlan, restore, resume_plan, save
from selfflow.training.tracking import MetricMeter, RunLogger

TEACHER_OBJECTIVES = ("self_flow", "sra")
TASK_OF = {tuple(sorted(mods)): task for task, mods in TASK_MODALITIES.items()}  # modalities -> task


@dataclass
class Trainer:
    """Everything one process trains with, plus the counters a checkpoint restores."""

    cfg: Config
    device: torch.device
    models: Models
    ema: EMA  # the evaluation model
    teacher_ema: EMA  # the Self-Flow / SRA teacher: `ema` itself unless train.teacher_decay >= 0
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # every draw of the objective, on the training device
    media: MediaTokenizer
    encode_text: TextConditioner
    step: int = 0
    samples_seen: int = 0
    task_samples: dict[str, int] = field(default_factory=dict)  # samples seen per task
    skipped: int = 0  # bad samples the data pipeline has skipped so far
    nonfinite: int = 0  # steps not applied because the loss or a gradient was NaN / Inf
    nonfinite_streak: int = 0  # of them, consecutive up to the last step (> 0: the last was one)
    data: DataPipeline | WorkerPipeline | None = None  # set by train(); its position is checkpointed
    dist: Dist = SINGLE  # this process's rank among `world` (training/distributed.py)
    engine: Any = None  # the DeepSpeed engine over student + head (dist.engine=deepspeed)
    ddp: Any = None  # DistributedDataParallel over student + head (dist.engine=ddp, several processes)


def _repa_encoder(cfg: Config, media: MediaTokenizer, device: torch.device) -> Any:
    if not cfg.objective.repa_encoder:
        raise ConfigError("objective.name=repa needs objective.repa_encoder (a local vision model directory)")
    from selfflow.training.encoders import build_encoder

    resolution = cfg.objective.repa_resolution or None
    return build_encoder(cfg.objective.repa_encoder, media, resolution).to(device)


def lr_factor(t: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (from 0) over train.lr: a linear warm-up over
    `warmup_steps`, then `schedule`: constant, or a cosine / linear decay to 0 at `max_steps`."""
    warmup = max(t.warmup_steps, 0)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
    if t.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress if t.schedule == "linear" else 1.0


def build_trainer(cfg: Config, device: str | torch.device | None = None, dist: Dist = SINGLE) -> Trainer:
    """Model (seeded by cfg.seed, the same on every rank), projector head, EMA(s), AdamW + warm-up, the
    objective's RNG (seeded per rank) and tokenizers; under dist.engine=deepspeed, the engine."""
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
    teacher = teacher_ema.model if name in TEACHER_OBJECTIVES else None
    params = list(student.parameters()) + (list(head.parameters()) if head is not None else [])
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, t))
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 1_000_003 * dist.rank)
    engine = dist_io.make_engine(cfg, dist, student, head, optimizer) if dist.deepspeed else None
    ddp = dist_io.make_ddp(student, head, device) if dist.multi and not dist.deepspeed else None
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


def make_batch(tr: Trainer, media: dict[str, Tensor], captions: list[str]) -> Batch:
    """Raw media {modality: [B, ...]} + captions -> the objective's Batch on the training device."""
    tokens, ids = tr.media.encode({m: x.to(tr.device, non_blocking=True) for m, x in media.items()})
    txt, mask = tr.encode_text(captions)
    return Batch(tokens, ids.to(tr.device), txt, mask, task=TASK_OF[tuple(sorted(media))])


def _local_update(tr: Trainer, out: ObjectiveOutput) -> bool:
    """Backward (under DDP the gradients are averaged across ranks as it runs), clip; step unless any
    rank saw a NaN / Inf."""
    tr.optimizer.zero_grad(set_to_none=True)
    out.loss.mean().backward()
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    clip = tr.cfg.train.grad_clip if tr.cfg.train.grad_clip > 0 else math.inf
    out.metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip)
    finite = torch.isfinite(out.loss).all() & torch.isfinite(out.metrics["grad_norm"])
    if any_rank(tr.dist, ~finite, tr.device):
        return False
    tr.optimizer.step()
    return True


def _engine_update(tr: Trainer, out: ObjectiveOutput) -> bool:
    """DeepSpeed: no backward at all when any rank's loss is NaN / Inf (all ranks skip together); else
    the engine's backward, clip and step. A non-finite global grad norm there is an overflow the engine
    itself does not apply; it is not applied to the EMA either."""
    if any_rank(tr.dist, ~torch.isfinite(out.loss).all(), tr.device):
        out.metrics["grad_norm"] = torch.full((), math.nan, device=tr.device)
        return False
    norm = dist_io.engine_backward_step(tr.engine, out.loss.mean()).to(tr.device)
    out.metrics["grad_norm"] = norm
    return bool(torch.isfinite(norm))


def train_step(tr: Trainer, batch: Batch) -> ObjectiveOutput:
    """One optimizer step of `cfg.objective` on `batch`, then the EMA update(s). Metrics gain
    `grad_norm` (before clipping). A NaN / Inf loss or gradient (on any rank) skips the update, the
    scheduler and the EMAs and counts in `tr.nonfinite` / `tr.nonfinite_streak`: the one host sync of a
    step (with several processes, one all-reduce)."""
    tr.models.student.train()
    run = OBJECTIVES[tr.cfg.objective.name]
    with autocast(tr.device, tr.cfg.train.precision):
        wrapper = tr.engine if tr.engine is not None else tr.ddp
        if wrapper is not None:  # through the engine / DDP, whose hooks gather ZeRO-3 parameters or
            out = wrapper(run, tr.models, batch, tr.generator, tr.cfg.objective)  # reduce gradients
        else:
            out = run(tr.models, batch, tr.generator, tr.cfg.objective)
    applied = _engine_update(tr, out) if tr.engine is not None else _local_update(tr, out)
    if applied:
        tr.scheduler.step()
        with full_parameters(tr.engine, tr.models.student):
            update_all((tr.ema, tr.teacher_ema), tr.models.student)
        tr.nonfinite_streak = 0
    else:
        if tr.engine is None:
            tr.optimizer.zero_grad(set_to_none=True)
        tr.nonfinite, tr.nonfinite_streak = tr.nonfinite + 1, tr.nonfinite_streak + 1
    tr.step += 1
    tr.samples_seen += out.loss.shape[0]
    tr.task_samples[batch.task] = tr.task_samples.get(batch.task, 0) + out.loss.shape[0]
    return out


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
    if d.num_workers > 0:
        return WorkerPipeline(kwargs, d.num_workers, timeout=d.worker_timeout_s)
    return DataPipeline(**kwargs)


def data_stream(tr: Trainer, data: DataPipeline | WorkerPipeline) -> Iterator[tuple[Batch, MediaBatch]]:
    """Endless (batch, the pipeline's batch: captions, sample keys, skipped samples) from the mixed-task
    pipeline."""
    for item in data:
        tr.skipped = data.skipped_count
        yield make_batch(tr, item.media, item.captions), item


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
    path: Path,
    should_stop: Callable[[], bool] | None = None,
) -> Path | None:
    """A grid from the EMA model for the task of the first batch: `sample.num` images, or one row of
    frames per clip for video / AV (audio-only runs draw nothing). Prompts cycle; seeds sample.seed + i.
    `should_stop` is asked before every model forward: when it says yes (a preemption signal) the grid
    is abandoned within one forward and nothing is written (None), so the run can save and exit."""
    s = tr.cfg.sample
    mods = TASK_MODALITIES[task]
    if mods == ("audio",):
        return None
    chosen = [prompts[i % len(prompts)] for i in range(s.num)]
    seeds = [s.seed + i for i in range(s.num)]
    try:
        media = gen.generate(
            chosen, seeds, mods, s.steps, s.sampler, s.cfg_scale, s.shift, should_stop=should_stop
        )
    except SamplingStopped:
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
    started_from = None
    if plan.ckpt is not None:
        restore(tr, plan.ckpt)
    elif cfg.train.init_from:  # a fresh run that starts from trained weights
        started_from = init_from(tr, cfg.train.init_from)
    if main:
        save_config(cfg, run_dir / "config.yaml")
    summary = {"run_dir": str(run_dir), "step": tr.step, "checkpoint": str(plan.ckpt), "preempted": None}
    if tr.step >= cfg.train.max_steps:
        return {**summary, "last": {"step": tr.step}}
    logger = RunLogger(run_dir, resume_step=tr.step) if main else dist_io.QuietLogger()
    for event in plan.events():
        logger.log(tr.step, event)
    if started_from is not None:
        logger.log(tr.step, {"event": "init_from", "source": started_from})
    meter = MetricMeter(cfg.train.t_bins, tr.device)
    sampler = Generator(cfg, tr.ema.model, tr.device, cfg.train.precision, tr.media, tr.encode_text)
    bar = tqdm(total=cfg.train.max_steps, initial=tr.step, disable=not progress, desc=cfg.objective.name)
    prompts: list[str] = list(cfg.sample.prompts)
    last, grid_task = {"step": tr.step}, None
    with Preemption(cfg.train.preempt_signals) as stop, logger, bar:
        for batch, item in data_stream(tr, tr.data):
            prompts = prompts or sorted(set(item.captions))
            grid_task = grid_task or batch.task
            out = train_step(tr, batch)
            for where, reason in item.skipped:  # bad samples met while this batch was read
                logger.log(tr.step, {"event": "skipped_sample", "sample": where, "reason": reason})
            if tr.nonfinite_streak:
                check_nonfinite(tr, out, item.keys, logger)
            else:
                meter.add(
                    out.metrics, out.levels[:, 0], out.loss_gen, batch.ids.shape[0] + batch.txt.shape[1]
                )
            bar.update(1)
            done = tr.step >= cfg.train.max_steps
            if tr.step % cfg.train.log_every == 0 or done:
                last = _log_interval(tr, meter, logger, bar)
            if main and ((cfg.sample.every and tr.step % cfg.sample.every == 0) or done):
                grid = run_dir / "samples" / f"step_{tr.step:08d}.png"
                write_samples(tr, sampler, prompts, grid_task, grid, lambda: stop.requested is not None)
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
