"""One optimizer step: the objective's forward and backward over `train.grad_accum` micro-batches, the
gradient clip, the update and the EMA(s); the same code for one process and every engine.

    out = train_step(trainer, batch)            # one micro-batch
    out = train_step(trainer, [b1, b2])         # gradient accumulation: one step over both

Accumulation. Each micro-batch contributes its summed loss over the step's total number of samples, so
micro-batches of any sizes give the gradient of one batch of all their samples (to fp32 rounding).
Under DDP and FSDP2 only the last micro-batch's backward reduces gradients across ranks (`no_sync` /
`set_requires_gradient_sync`; FSDP2 then holds whole fp32 gradients between micro-batches); under
DeepSpeed its engine accumulates (`gradient_accumulation_steps` = `train.grad_accum`).

Non-finite steps. A NaN / Inf loss or gradient on any rank skips the update, the scheduler and the EMAs
for every rank (one all-reduce) and counts in `nonfinite` / `nonfinite_streak`.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from selfflow.inference.pipeline import autocast
from selfflow.training import distributed as dist_io
from selfflow.training.distributed import any_rank
from selfflow.training.ema import update_all
from selfflow.training.objectives import OBJECTIVES, Batch, ObjectiveOutput

if TYPE_CHECKING:
    from selfflow.training.state import Trainer


def _forward(tr: Trainer, batch: Batch) -> ObjectiveOutput:
    run = OBJECTIVES[tr.cfg.objective.name]
    with autocast(tr.device, tr.cfg.train.precision):
        wrapper = tr.engine if tr.engine is not None else tr.ddp
        if wrapper is not None:  # through the engine / DDP, whose hooks gather ZeRO-3 parameters or
            return wrapper(run, tr.models, batch, tr.generator, tr.cfg.objective)  # reduce gradients
        return run(tr.models, batch, tr.generator, tr.cfg.objective)


def _sync_on(tr: Trainer, last: bool) -> contextlib.AbstractContextManager:
    """Gradient reduction across ranks only in the last micro-batch's backward."""
    if tr.dist.fsdp:
        from selfflow.training.fsdp import set_gradient_sync

        set_gradient_sync(tr, last)
    if tr.ddp is not None and not last:
        return tr.ddp.no_sync()
    return contextlib.nullcontext()


def _merge(outs: list[ObjectiveOutput]) -> ObjectiveOutput:
    """One output for the step: per-sample tensors concatenated, metrics averaged over the samples."""
    if len(outs) == 1:
        return outs[0]
    sizes = [o.loss.shape[0] for o in outs]
    metrics = {
        k: sum(o.metrics[k] * n for o, n in zip(outs, sizes, strict=True)) / sum(sizes)
        for k in outs[0].metrics
    }
    gen = [o.loss_gen for o in outs]
    loss_gen = torch.cat(gen) if all(g is not None for g in gen) else None  # type: ignore[arg-type]
    return ObjectiveOutput(
        torch.cat([o.loss for o in outs]), torch.cat([o.levels for o in outs]), metrics, loss_gen
    )


def _local_update(tr: Trainer, micro: list[Batch]) -> tuple[ObjectiveOutput, bool]:
    """Forward and backward of each micro-batch (reduced across ranks in the last), clip; step unless
    any rank saw a NaN / Inf."""
    tr.optimizer.zero_grad(set_to_none=True)
    outs, total = [], sum(b.samples for b in micro)
    for i, batch in enumerate(micro):
        with _sync_on(tr, i == len(micro) - 1):
            out = _forward(tr, batch)
            (out.loss.sum() / total).backward()  # the mean over the step's samples, whatever the sizes
        outs.append(out)
    out = _merge(outs)
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    clip = tr.cfg.train.grad_clip if tr.cfg.train.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if tr.dist.fsdp:
        from selfflow.training.fsdp import full_tensor

        norm = full_tensor(norm)
    out.metrics["grad_norm"] = norm
    finite = torch.isfinite(out.loss).all() & torch.isfinite(norm)
    if any_rank(tr.dist, ~finite, tr.device):
        return out, False
    tr.optimizer.step()
    return out, True


def _engine_update(tr: Trainer, micro: list[Batch]) -> tuple[ObjectiveOutput, bool]:
    """DeepSpeed: each micro-batch's forward, then (unless any rank's loss is NaN / Inf: all ranks skip
    together, before any backward) the engine's backward and step; the engine applies the update at the
    last micro-batch. A non-finite global grad norm there is an overflow the engine itself does not
    apply; it is not applied to the EMA either."""
    outs = [_forward(tr, batch) for batch in micro[:-1]]  # kept alive: backward runs below
    outs.append(_forward(tr, micro[-1]))
    out = _merge(outs)
    if any_rank(tr.dist, ~torch.isfinite(out.loss).all(), tr.device):
        out.metrics["grad_norm"] = torch.full((), math.nan, device=tr.device)
        return out, False
    total = sum(b.samples for b in micro)  # the engine divides by its accumulation steps itself
    for part in outs:
        norm = dist_io.engine_backward_step(tr.engine, part.loss.sum() * len(micro) / total)
    out.metrics["grad_norm"] = norm.to(tr.device)
    return out, bool(torch.isfinite(norm))


def train_step(tr: Trainer, batch: Batch | list[Batch]) -> ObjectiveOutput:
    """One optimizer step of `cfg.objective` on `batch` (or its micro-batches), then the EMA update(s).
    Metrics gain `grad_norm` (before clipping). A NaN / Inf loss or gradient (on any rank) skips the
    update: the step's one host sync besides the attention layout of a padded batch (with several
    processes, one all-reduce)."""
    micro = batch if isinstance(batch, list) else [batch]
    tr.models.student.train()
    update = _engine_update if tr.engine is not None else _local_update
    out, applied = update(tr, micro)
    if applied:
        tr.scheduler.step()
        update_all((tr.ema, tr.teacher_ema), tr.models.student, dist_io.zero3_gather(tr.engine))
        tr.nonfinite_streak = 0
    else:
        if tr.engine is None:
            tr.optimizer.zero_grad(set_to_none=True)
        tr.nonfinite, tr.nonfinite_streak = tr.nonfinite + 1, tr.nonfinite_streak + 1
    tr.step += 1
    tr.samples_seen += out.loss.shape[0]
    for b in micro:
        for task in b.sample_tasks or [b.task] * b.samples:
            tr.task_samples[task] = tr.task_samples.get(task, 0) + 1
    return out
