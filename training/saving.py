"""Saving and resuming a training run (`training/loop.py` re-exports `save` and `restore`).

    save(tr, run_dir)        # checkpoints/step_<step>/; every rank calls it when there are several
    restore(tr, ckpt)        # the exact state the run had: weights, EMAs, optimizer, RNG, data position

One process writes `trainer.pt` (optimizer, scheduler, RNG) and the data position in `state.json`. With
several processes (or DeepSpeed) rank 0 writes the weights, `trainer.pt` (scheduler, and the optimizer
when it is replicated) and `state.json`; every rank adds its RNG states, its optimizer shard (ZeRO)
and its data position as `rank_<r>.pt` / `rank_<r>.json`. Resuming needs the same number of processes.

    plan = resume_plan(cfg, dist)   # which checkpoint to resume from, and the newer ones skipped (why)

Resuming takes the newest complete checkpoint (training/checkpoint.py checks each against its manifest)
and reports the newer ones it skipped. When checkpoints exist but none is usable, the run stops with a
ConfigError rather than silently starting again at step 0 over the old metrics; `train.restart=true`
allows starting over, after moving the unusable checkpoints, metrics.jsonl and wandb_id aside (never
deleting them) into `<run.dir>/unusable-<UTC time>/`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selfflow.configs.schema import Config, ConfigError, load_config
from selfflow.training import checkpoint as ckpt_io
from selfflow.training import distributed as dist_io
from selfflow.training.distributed import SINGLE, Dist, full_parameters

if TYPE_CHECKING:
    from selfflow.training.state import Trainer

# Sections a checkpoint must agree on with the command that resumes it.
FROZEN_SECTIONS = ("model", "spec", "text", "codecs")


def _weights(tr: Trainer) -> dict[str, dict[str, Tensor]]:
    """Full weights by file name; under ZeRO-3 every rank takes part in gathering them (CPU copies)."""
    weights = {}
    for name, module in (("model", tr.models.student), ("head", tr.models.head)):
        if module is not None:
            with full_parameters(tr.engine, module):
                live = module.state_dict()
            copied = {k: v.to("cpu", copy=True) for k, v in live.items()} if tr.engine is not None else live
            weights[name] = copied
    weights["ema"] = tr.ema.weights()
    if tr.teacher_ema is not tr.ema:
        weights["ema_teacher"] = tr.teacher_ema.weights()
    return weights


def _ranked(tr: Trainer) -> bool:
    """Whether checkpoints hold per-rank files (several processes, or any DeepSpeed run)."""
    return tr.dist is not SINGLE or tr.engine is not None


def _engine_name(tr: Trainer) -> str:
    if tr.engine is not None:
        return f"deepspeed-zero{tr.engine.zero_optimization_stage()}"
    return "fsdp" if tr.dist.fsdp else "ddp"


def _check_layout(tr: Trainer, ckpt: Path, state: dict) -> None:
    """The optimizer state is laid out per engine, ZeRO stage and rank: resuming needs the same three,
    except that FSDP2's DCP checkpoints reshard to any number of processes."""
    saved = (int(state.get("world", 1)), state.get("engine", "ddp"))
    if saved[1] == "fsdp" == _engine_name(tr):
        return
    if saved != (tr.dist.world, _engine_name(tr)):
        raise ConfigError(
            f"{ckpt} was written by {saved[0]} process(es) with {saved[1]}, this run has {tr.dist.world} "
            f"with {_engine_name(tr)}: resume with the same number of processes and dist.engine / "
            "dist.zero_stage (the optimizer shards and data positions are per rank)"
        )


def save(tr: Trainer, run_dir: Path) -> Path:
    """A checkpoint of the run; with several processes every rank must call it (collective)."""
    shared = None
    if tr.dist.fsdp:
        from selfflow.training import fsdp

        weights = fsdp.full_weights(tr)  # gathered to rank 0, for sampling and snapshots
        shared = partial(fsdp.save_sharded, tr)  # what resumes: every rank's shards, in dcp/
    else:
        weights = _weights(tr)
    trainer = {"scheduler": tr.scheduler.state_dict()}
    if tr.engine is None and shared is None:  # replicated: rank 0's copy is every rank's
        trainer["optimizer"] = tr.optimizer.state_dict()
    rng = {"generator": tr.generator.get_state(), "cpu_rng": torch.get_rng_state()}
    state = {"samples_seen": tr.samples_seen, "ema": tr.ema.meta(), "nonfinite": tr.nonfinite}
    state["task_samples"] = dict(tr.task_samples)
    data = tr.data.state_dict() if tr.data is not None else None
    state["ema_teacher"] = tr.teacher_ema.meta()
    root, keep = run_dir / "checkpoints", tr.cfg.train.keep_last
    if not _ranked(tr):
        state["data"] = data
        return ckpt_io.save_checkpoint(root, tr.step, weights, trainer | rng, state, tr.cfg, keep)
    if tr.engine is not None:
        rng["optimizer"] = dist_io.optimizer_state(tr.engine)
    state |= {"world": tr.dist.world, "engine": _engine_name(tr)}
    mine = (rng, {"samples_seen": tr.samples_seen, "task_samples": dict(tr.task_samples), "data": data})
    main = (weights, trainer, state, tr.cfg) if tr.dist.is_main else None
    return ckpt_io.save_checkpoint_ranks(
        root, tr.step, tr.dist.rank, lambda: dist_io.barrier(tr.dist), main, mine, keep, shared
    )


@dataclass
class ResumePlan:
    """Where a run starts: `ckpt` (None: step 0), the newer checkpoints skipped as "<name>: <reason>",
    and where unusable checkpoints were moved when `train.restart` started over."""

    ckpt: Path | None
    skipped: list[str] = field(default_factory=list)
    moved_to: Path | None = None

    def events(self) -> list[dict[str, str]]:
        """metrics.jsonl rows (less the step) that record this plan."""
        rows = [{"event": "checkpoint_skipped", "reason": reason} for reason in self.skipped]
        if self.moved_to is not None:
            rows.append({"event": "restarted", "moved_to": str(self.moved_to)})
        return rows


def _set_aside(run_dir: Path) -> Path:
    """Move checkpoints/, metrics.jsonl and wandb_id of `run_dir` into a new `unusable-<UTC time>/` folder
    (the run starting over at step 0 is a new wandb run)."""
    aside = run_dir / time.strftime("unusable-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for name in ("checkpoints", "metrics.jsonl", "wandb_id"):
        if (run_dir / name).exists():
            (run_dir / name).rename(aside / name)
    return aside


def resume_plan(cfg: Config, dist: Dist = SINGLE) -> ResumePlan:
    """The checkpoint this run resumes from (every rank reaches the same plan; rank 0 prints what was
    skipped). ConfigError when checkpoints exist but none is usable, unless `train.restart`."""
    run_dir = Path(cfg.run.dir)
    root = run_dir / "checkpoints"
    found, skipped = ckpt_io.scan_checkpoints(root)
    plan = ResumePlan(found, skipped)
    unusable = found is None and ckpt_io.has_checkpoints(root)
    if unusable and not cfg.train.restart:
        why = "; ".join(skipped) or f"{ckpt_io.LATEST} names a checkpoint that is gone"
        raise ConfigError(
            f"{root} has checkpoints but none is usable ({why}): repair or remove them, or set "
            f"train.restart=true to start again at step 0 (they are then moved to {run_dir}/unusable-*/)"
        )
    for reason in skipped if dist.is_main else ():
        print(f"warning: skipping checkpoint {reason}", file=sys.stderr)
    if not unusable:
        return plan
    dist_io.barrier(dist)  # every rank has looked before rank 0 moves anything
    if dist.is_main:
        plan.moved_to = _set_aside(run_dir)
        print(f"warning: train.restart: moved unusable checkpoints to {plan.moved_to}", file=sys.stderr)
    dist_io.barrier(dist)
    return plan


def check_compatible(cfg: Config, ckpt: Path) -> None:
    """The resuming command must describe the same model as the checkpoint; other sections may change."""
    saved = load_config(ckpt / "config.yaml")
    for section in FROZEN_SECTIONS:
        old, new = asdict(getattr(saved, section)), asdict(getattr(cfg, section))
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{ckpt} was trained with {section}.{k}={old.get(k)!r}, this run has {new[k]!r}; "
                "use another run.dir to start afresh"
            )
    if saved.objective.name != cfg.objective.name:
        raise ConfigError(
            f"{ckpt} trained objective {saved.objective.name}, this run asks for {cfg.objective.name}"
        )


def _load_module(tr: Trainer, module: nn.Module, ckpt: Path, name: str) -> None:
    with full_parameters(tr.engine, module, modifier_rank=0):  # ZeRO-3: rank 0's copy is re-sharded
        module.load_state_dict(ckpt_io.load_weights(ckpt, name, tr.device))


def _load_weights(tr: Trainer, ckpt: Path, state: dict) -> None:
    """Student, head and EMA(s): FSDP2 reads its DCP shards, the others the safetensors files."""
    if tr.dist.fsdp:
        from selfflow.training import fsdp

        fsdp.load_sharded(tr, ckpt)  # the optimizer too
        tr.ema.load_meta(state["ema"])
        tr.teacher_ema.load_meta(state["ema_teacher"])
        return
    _load_module(tr, tr.models.student, ckpt, "model")
    tr.ema.load_state_dict({**state["ema"], "model": ckpt_io.load_weights(ckpt, "ema", tr.device)})
    if tr.teacher_ema is not tr.ema:
        teacher = ckpt_io.load_weights(ckpt, "ema_teacher", tr.device)
        tr.teacher_ema.load_state_dict({**state["ema_teacher"], "model": teacher})
    if tr.models.head is not None:
        _load_module(tr, tr.models.head, ckpt, "head")


def _resharded(tr: Trainer, ckpt: Path, saved_world: int, step: int) -> tuple[dict, dict]:
    """(counters and data position, RNG states) for a job whose process count differs from the one that
    saved `ckpt` (FSDP2): rank 0's counters; every task's data stream starts its next epoch (the rest of
    the interrupted one is not read: the shard split has changed); the RNGs are seeded anew from
    (seed, rank, step)."""
    from selfflow.data.pipeline import next_epoch_state

    saved = [ckpt_io.load_rank(ckpt, r)[0] for r in range(saved_world)]
    mine = dict(saved[0])
    datas = [s["data"] for s in saved if s.get("data")]
    mine["data"] = next_epoch_state(datas) if datas else None
    seed = tr.cfg.seed + 1 + 1_000_003 * tr.dist.rank + 7_919 * step
    generator = torch.Generator(device=tr.generator.device).manual_seed(seed)
    cpu = torch.Generator().manual_seed(seed)
    return mine, {"generator": generator.get_state(), "cpu_rng": cpu.get_state()}


def restore(tr: Trainer, ckpt: Path) -> list[dict]:
    """Load weights, EMA(s), optimizer, scheduler, RNG states and counters from a checkpoint (with several
    processes: on every rank, each reading its own RNG, optimizer shard and data position). Returns the
    metrics.jsonl events (less the step) of what changed on the way: a resharded FSDP2 state."""
    check_compatible(tr.cfg, ckpt)
    state, trainer = ckpt_io.load_state(ckpt)
    _check_layout(tr, ckpt, state)
    _load_weights(tr, ckpt, state)
    saved_world, events = int(state.get("world", 1)), []
    if _ranked(tr) and saved_world != tr.dist.world:
        mine, rng = _resharded(tr, ckpt, saved_world, int(state["step"]))
        events.append({"event": "resharded", "from_processes": saved_world, "to_processes": tr.dist.world})
    else:
        mine, rng = ckpt_io.load_rank(ckpt, tr.dist.rank) if _ranked(tr) else (state, trainer)
    if tr.engine is not None:
        dist_io.load_optimizer_state(tr.engine, tr.dist, rng["optimizer"])
    elif not tr.dist.fsdp:
        tr.optimizer.load_state_dict(trainer["optimizer"])
    tr.scheduler.load_state_dict(trainer["scheduler"])
    tr.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["cpu_rng"])
    tr.step, tr.samples_seen = int(state["step"]), int(mine["samples_seen"])
    tr.task_samples = {t: int(n) for t, n in mine.get("task_samples", {}).items()}
    tr.nonfinite = int(state.get("nonfinite", 0))
    if tr.data is not None and mine.get("data"):  # the next batch is the interrupted run's next batch
        tr.data.load_state_dict(mine["data"])
    return events
