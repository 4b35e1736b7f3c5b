"""Starting a run from trained weights (`train.init_from`): fine-tuning, or continuing a model with a new
recipe. The student and the EMA(s) take the weights of a training checkpoint (its `model` and `ema`) or
of a snapshot (its EMA weights for both); the optimizer, scheduler, counters and data position start
fresh at step 0. It applies only when the run has no checkpoint of its own: a relaunch resumes.

    init_from(trainer, "runs/base-pretrain")     # a run dir, a checkpoints/ dir, a step dir or a snapshot
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selfflow.configs.schema import ConfigError
from selfflow.inference.snapshot import is_snapshot, read_snapshot
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.distributed import full_parameters

if TYPE_CHECKING:
    from selfflow.training.state import Trainer


def _source_weights(source: str) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """(student weights, EMA weights, the path they came from)."""
    if is_snapshot(source):
        try:
            _, weights, _ = read_snapshot(source)
        except ValueError as e:  # a damaged, swapped or inconsistent snapshot: bad input, one line
            raise ConfigError(f"train.init_from {source}: {e}") from None
        weights = {k: v.float() for k, v in weights.items()}
        return weights, weights, str(source)
    ckpt = ckpt_io.resolve_checkpoint(source)
    return ckpt_io.load_weights(ckpt, "model"), ckpt_io.load_weights(ckpt, "ema"), str(ckpt)


def check_fits(module: nn.Module, weights: dict[str, Tensor], source: str) -> None:
    """ConfigError naming the first tensor that is missing, unexpected or of another shape."""
    mine = {k: v.shape for k, v in module.state_dict().items()}
    missing, extra = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
    if missing or extra:
        name, what = (missing[0], "is missing") if missing else (extra[0], "is not in this model")
        raise ConfigError(f"train.init_from {source}: tensor {name} {what}")
    for name, shape in mine.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise ConfigError(
                f"train.init_from {source}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"this model {tuple(shape)}"
            )


@torch.no_grad()
def init_from(tr: Trainer, source: str) -> str:
    """Load the student and the EMA(s) from `source` (see the module docstring); returns what was read."""
    student, ema, where = _source_weights(source)
    check_fits(tr.models.student, student, where)
    check_fits(tr.ema.model, ema, where)
    copies = [e.model for e in {id(e): e for e in (tr.ema, tr.teacher_ema)}.values()]
    if tr.dist.fsdp:  # every rank keeps its shards of the whole tensors
        from selfflow.training.fsdp import load_full

        for module, weights in [(tr.models.student, student)] + [(c, ema) for c in copies]:
            load_full(module, weights)
        return where
    with full_parameters(tr.engine, tr.models.student, modifier_rank=0):  # ZeRO-3: re-sharded after
        tr.models.student.load_state_dict({k: v.to(tr.device) for k, v in student.items()})
    for copy in copies:
        copy.load_state_dict({k: v.to(tr.device) for k, v in ema.items()})
    return where
