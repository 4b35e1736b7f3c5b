"""FSDP2 (`dist.engine=fsdp`): torch's `fully_shard` over every transformer block and the root, for the
student, the projector head and the EMA copies (the Self-Flow teacher), with checkpoints written by
`torch.distributed.checkpoint` (DCP) that resume on another number of processes.

    torchrun --nproc_per_node 8 training/main.py --config ... dist.engine=fsdp

Sharding (`shard_run`). Each block of the student's ModuleLists (double and single stream) is one FSDP
unit, the rest of the student (embedders, modulation, final layer) is the root unit, the head is its own
unit. Every rank keeps 1/world of each parameter (a DTensor shard); a unit's full parameters exist only
during its forward and backward, and gradients are reduce-scattered per unit. On CUDA with bf16
(`train.precision`) units compute in bf16 and reduce gradients in fp32; the stored parameters, the
optimizer and the EMA stay fp32. Activation checkpointing (`model.grad_checkpointing`) recomputes a
block inside its unit. All ranks run the same task in a step (`DataPipeline.next_task`), so every rank
issues the same collectives.

EMA / teacher. The EMA copies are sharded exactly like the student: each rank averages its own shards
(`EMA.update` works on the local shards, no gather), and the teacher forward all-gathers block by block
as the student does. A grid of samples is drawn by all ranks together (the forward is collective).

Checkpoints. `sharded_state` is model + head (one state dict), optimizer and EMAs as DTensor shards:
`dcp.save` writes each rank's shards into `<ckpt>/dcp/` and `dcp.load` reads them back into whatever
sharding the resuming job has (1 -> 2 or 2 -> 1 processes included). Full safetensors of the student,
head and EMA(s) are gathered to rank 0 as well (`full_weights`), for sampling, snapshots and
`train.init_from`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from selfflow.training.distributed import ObjectiveModule
from selfflow.training.ema import EMA

if TYPE_CHECKING:
    from selfflow.training.state import Trainer

DCP_DIR = "dcp"  # inside a checkpoint folder


def mixed_precision(device: torch.device, precision: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA (precision auto | bf16); fp32 otherwise."""
    # the units' floating-point inputs keep their dtype: the levels t, the fp32 residual stream and the
    # rotary tables would otherwise be rounded to bf16 at every block (autocast does the matmuls in bf16)
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def shard_module(module: nn.Module, policy: MixedPrecisionPolicy, reshard_root: bool = False) -> FSDPModule:
    """`fully_shard` on each element of the module's ModuleLists (the transformer blocks), then on the
    module itself (everything else). Parameter names do not change. The root stays whole from forward to
    backward unless `reshard_root` (a module that is never trained: the EMA copies)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, mp_policy=policy)
    root = fully_shard(module, mp_policy=policy, reshard_after_forward=True if reshard_root else None)
    if hasattr(module, "condition"):  # MMDiT.condition (the sampler's once-per-grid text pass) reads
        register_fsdp_forward_method(module, "condition")  # root parameters: gather them for it too
    return root


def shard_run(
    student: nn.Module, head: nn.Module | None, emas: list[EMA], device: torch.device, precision: str
) -> None:
    """Shard the student, the head and each distinct EMA copy in place (before the optimizer is built:
    it must hold the sharded parameters)."""
    policy = mixed_precision(device, precision)
    shard_module(student, policy)
    if head is not None:
        fully_shard(head, mp_policy=policy)
    for ema in {id(e): e for e in emas}.values():
        shard_module(ema.model, policy, reshard_root=True)  # no backward would reshard it


def set_gradient_sync(tr: Trainer, sync: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (False: accumulate them unsharded, for
    all but the last micro-batch of `train.grad_accum`)."""
    for module in (tr.models.student, tr.models.head):
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync)


def full_tensor(value: Tensor) -> Tensor:
    """A DTensor's full value (a collective); a plain tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_bytes(tr: Trainer) -> int:
    """Bytes this rank holds of the student, head, EMA copies and optimizer state (local shards only):
    what FSDP2 divides by the number of processes."""
    modules = [
        tr.models.student,
        tr.models.head,
        *{id(e.model): e.model for e in (tr.ema, tr.teacher_ema)}.values(),
    ]
    tensors = [t for m in modules if m is not None for t in m.state_dict().values()]
    tensors += [v for state in tr.optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


# ---------------------------------------------------------------- checkpoints


def _emas(tr: Trainer) -> dict[str, EMA]:
    emas = {"ema": tr.ema}
    if tr.teacher_ema is not tr.ema:
        emas["ema_teacher"] = tr.teacher_ema
    return emas


def sharded_state(tr: Trainer, with_optimizer: bool = True) -> dict[str, Any]:
    """This rank's shards of everything a resume needs, as DCP state dicts (the keys name the parts).
    torch fills an optimizer without state by taking a zero-lr step (AdamW's step count would then be
    off by one): an optimizer that has taken no step yet is left out (`with_optimizer`)."""
    both = ObjectiveModule(tr.models.student, tr.models.head)
    if with_optimizer:
        model, optimizer = get_state_dict(both, tr.optimizer)
        state = {"model": model, "optimizer": optimizer}
    else:
        state = {"model": get_model_state_dict(both)}
    return state | {name: get_model_state_dict(ema.model) for name, ema in _emas(tr).items()}


def save_sharded(tr: Trainer, folder: Path) -> None:
    """Every rank writes its shards into `folder/dcp/` (DCP fsyncs each file it writes)."""
    dcp.save(sharded_state(tr, bool(tr.optimizer.state)), checkpoint_id=str(folder / DCP_DIR))


def load_sharded(tr: Trainer, ckpt: Path) -> None:
    """Read `ckpt/dcp/` into this job's sharding, whatever the number of processes that wrote it."""
    saved = dcp.FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata
    with_optimizer = any(key.startswith("optimizer.") for key in saved)
    state = sharded_state(tr, with_optimizer)
    if not with_optimizer:  # saved before the first applied step: the optimizer starts fresh, as it was
        dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
        set_model_state_dict(ObjectiveModule(tr.models.student, tr.models.head), state["model"])
        for name, ema in _emas(tr).items():
            set_model_state_dict(ema.model, state[name])
        return
    # AdamW keeps no state for a parameter that never had a gradient (another task's projections): keep
    # it so, rather than the zero state torch's state-dict helpers make up for every parameter
    kept = {k: v for k, v in state["optimizer"]["state"].items() if f"optimizer.state.{k}.step" in saved}
    state["optimizer"]["state"] = kept
    dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
    both = ObjectiveModule(tr.models.student, tr.models.head)
    set_state_dict(
        both,
        tr.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # the parameters without optimizer state (above)
    )
    for name, ema in _emas(tr).items():
        set_model_state_dict(ema.model, state[name])


def load_full(module: nn.Module, weights: dict[str, Tensor]) -> None:
    """Whole tensors (the same on every rank) into a sharded module: each rank keeps its shards."""
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))


def full_weights(tr: Trainer) -> dict[str, dict[str, Tensor]]:
    """Whole CPU weights by file name on rank 0 ({} elsewhere); every rank takes part in the gathers."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    modules = {"model": tr.models.student, "head": tr.models.head}
    modules |= {name: ema.model for name, ema in _emas(tr).items()}
    weights = {}
    for name, module in modules.items():
        if module is not None:
            weights[name] = get_model_state_dict(module, options=options)
    return weights if tr.dist.is_main else {}
