"""Several processes training one model: process groups, the all-rank decisions, data-parallel gradients
and the DeepSpeed engine. `training/loop.py` calls in here only when more than one process runs (or
`dist.engine=deepspeed`), so a plain `python training/main.py` run takes none of these paths.

    torchrun --nproc_per_node 8 training/main.py --config ...                      # dist.engine=ddp
    torchrun --nproc_per_node 8 training/main.py --config ... dist.engine=fsdp
    deepspeed --num_gpus 8 training/main.py --config ... dist.engine=deepspeed dist.zero_stage=3

Engines. `ddp`: every rank keeps the full model and optimizer, and torch's DistributedDataParallel over
the student and projector head averages the gradients while backward runs (`make_ddp`), so every rank
applies the same update. `fsdp`: torch's FSDP2 shards the student, head, optimizer and EMA copies
(training/fsdp.py). `deepspeed`: the student and head run inside a DeepSpeed engine with ZeRO stage 0,
2 or 3 over the same torch AdamW; its JSON config is generated from `train.*` (`deepspeed_config`).

EMA. Under ddp and DeepSpeed the EMA copies (the Self-Flow teacher) are full replicas on every rank: the
teacher forward needs no collective. After each applied optimizer step the EMA reads the student's
parameters; under ZeRO-3 they are gathered one module at a time (`zero3_gather`). Under fsdp the copies
are sharded like the student.

Agreement. Whether a step is skipped (NaN / Inf loss or gradient on any rank) and whether the run stops
(a preemption signal on any rank) are all-reduced with MAX, so all ranks skip, save and stop together.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfflow.configs.schema import Config, ConfigError

# DeepSpeed keys `train.*` decides; a user JSON may repeat them only with the same value.
DERIVED_KEYS = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")  # fmt: skip


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, number of processes, rank on its node, engine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    engine: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.world > 1

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"

    @property
    def fsdp(self) -> bool:
        return self.engine == "fsdp"


SINGLE = Dist()


def _backend(cfg: Config, device: torch.device) -> str:
    if cfg.dist.backend != "auto":
        return cfg.dist.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_dist(cfg: Config, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group the launcher describes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR).
    Without a launcher and with engine ddp: the single process, nothing initialised (with fsdp or
    deepspeed: a group of one, so that their checkpoints and collectives work the same). A CUDA device
    becomes cuda:LOCAL_RANK. A collective that waits longer than `dist.timeout_s` for another rank
    fails (torch's default would be 10 or 30 minutes depending on the backend and engine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and cfg.dist.engine == "ddp":
        return SINGLE, device
    if world == 1:  # deepspeed / fsdp in a plain `python` process: a group of one
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("WORLD_SIZE", "1")
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend, timeout = _backend(cfg, device), timedelta(seconds=cfg.dist.timeout_s)
    if not torch.distributed.is_initialized():
        if cfg.dist.engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            device_id = device if backend == "nccl" else None
            torch.distributed.init_process_group(backend, timeout=timeout, device_id=device_id)
    return Dist(rank, torch.distributed.get_world_size(), local, cfg.dist.engine), device


def shutdown(dist: Dist) -> None:
    if dist is not SINGLE and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.multi:
        torch.distributed.barrier()


def any_rank(dist: Dist, flag: bool | Tensor, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (an all-reduce MAX); the flag itself when alone."""
    value = torch.as_tensor(flag, dtype=torch.int32, device=device).reshape(1)
    if dist.multi:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def make_ddp(student: nn.Module, head: nn.Module | None, device: torch.device) -> nn.Module:
    """torch's DistributedDataParallel over (student, head): gradients are averaged in buckets while
    backward runs. A step uses only its task's embedders and projections (the same task on every rank:
    `DataPipeline.next_task`), so the others are found unused and keep no gradient, as in one process."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        ObjectiveModule(student, head), device_ids=ids, find_unused_parameters=True
    )


# ---------------------------------------------------------------- DeepSpeed


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON of this run, from `train.*` and `dist.zero_stage`, with `dist.deepspeed_config`
    merged over it. Batch sizes, clipping, precision and optimizer come from the training config only (the
    optimizer is ours, bf16 is autocast around the forward as in a single process): a user file that
    sets one of them differently is a ConfigError."""
    t = cfg.train
    if cfg.dist.zero_stage == 0 and t.grad_accum > 1:  # its NaN check would see unreduced gradients
        raise ConfigError("train.grad_accum > 1 needs a ZeRO stage under DeepSpeed; or use dist.engine=ddp")
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip if t.grad_clip > 0 else 0.0,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if not cfg.dist.deepspeed_config:
        return generated
    path = Path(cfg.dist.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"dist.deepspeed_config: cannot read {path}: {e}") from None
    for key in DERIVED_KEYS:
        if key in user and user[key] != generated.get(key):
            raise ConfigError(
                f"{path} sets {key}={user[key]!r}; it follows the training config ({generated.get(key)!r}): "
                "set train.batch_size / train.grad_clip / train.precision / train.lr instead"
            )
    stage = user.get("zero_optimization", {}).get("stage", cfg.dist.zero_stage)
    if stage != cfg.dist.zero_stage:
        raise ConfigError(f"{path} sets zero_optimization.stage={stage}; use dist.zero_stage={stage}")
    return _merge(generated, user)


class ObjectiveModule(nn.Module):
    """The trainable modules as one module for the engine; `forward` runs the objective, so the engine's
    hooks (ZeRO-3 parameter gathering) see every student and head call."""

    def __init__(self, student: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.student, self.head = student, head

    def forward(self, run: Any, *args: Any) -> Any:
        return run(*args)


def make_engine(cfg: Config, dist: Dist, student: nn.Module, head: nn.Module | None, optimizer: Any) -> Any:
    """A DeepSpeed engine over (student, head) and our torch AdamW, configured by `deepspeed_config`."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=ObjectiveModule(student, head), optimizer=optimizer, config=deepspeed_config(cfg, dist.world)
    )
    return engine


def zero3(engine: Any) -> bool:
    return engine is not None and engine.zero_optimization_stage() == 3


def zero3_gather(engine: Any) -> Callable[[list[Tensor]], Any] | None:
    """Under ZeRO-3: a context factory that makes the given parameters whole (read-only) for the EMA
    update, module by module (`EMA.update(model, gather)`); otherwise None (parameters are whole)."""
    if not zero3(engine):
        return None
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params)


@contextlib.contextmanager
def full_parameters(
    engine: Any, module: nn.Module | None, modifier_rank: int | None = None
) -> Iterator[None]:
    """Under ZeRO-3: `module`'s full parameters inside the block (changes made on `modifier_rank` are kept
    and re-sharded on exit). Otherwise the parameters are already whole: nothing happens."""
    if module is None or not zero3(engine):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
        yield


def engine_backward_step(engine: Any, loss: Tensor) -> Tensor:
    """Backward (gradients reduced across ranks), clip and step inside the engine; the global grad norm
    before clipping. A non-finite gradient is never applied: ZeRO-2/3 treat an invalid norm as an
    overflow and skip the update themselves; stage 0 (plain gradients) is checked here."""
    engine.backward(loss)
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(norm):  # the same on every rank: the gradients are already averaged
            engine.optimizer.zero_grad(set_to_none=True)
            return norm.float().cpu()
    engine.step()
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float32)


# ---------------------------------------------------------------- sharded optimizer state

ZERO_OBJECTS = ("loss_scaler", "param_slice_mappings")  # rebuilt by the engine; not plain data


def optimizer_state(engine: Any) -> dict[str, Any]:
    """This rank's optimizer state as tensors and plain containers (loadable with weights_only=True)."""
    state = engine.optimizer.state_dict()
    if engine.zero_optimization_stage() == 0:
        return state
    plain = {k: v for k, v in state.items() if k not in ZERO_OBJECTS}
    plain["zero_stage"] = int(state["zero_stage"])
    return plain


def load_optimizer_state(engine: Any, dist: Dist, state: dict[str, Any]) -> None:
    """Restore `optimizer_state` of this rank (same world size and ZeRO stage as when it was saved)."""
    if engine.zero_optimization_stage() == 0:
        engine.optimizer.load_state_dict(state)
        return
    from deepspeed.runtime.zero.config import ZeroStageEnum

    full = {**state, "zero_stage": ZeroStageEnum(state["zero_stage"])}
    full["loss_scaler"] = engine.optimizer.loss_scaler
    per_rank: list[dict[str, Any] | None] = [None] * dist.world
    per_rank[dist.rank] = full  # rigid ZeRO checkpoints read only their own rank's entry
    engine.optimizer.load_state_dict(per_rank, load_from_fp32_weights=True)


class QuietLogger:
    """What ranks other than 0 log through: nothing (rank 0 writes metrics.jsonl and the trackers)."""

    def __enter__(self) -> QuietLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log(self, step: int, values: dict[str, Any]) -> None:
        return None
