"""Exponential moving average (EMA) of the model weights: Self-Flow's teacher and evaluation model.

Self-Flow keeps one EMA copy (decay 0.9999, updated after every optimizer step) that serves both as
the self-distillation teacher (a no-grad forward every step) and as the model that is evaluated. Short
runs may give the teacher its own, faster decay; `make_emas` then returns two copies, else one object
plays both roles.

Sharding: under FSDP2 the copy is sharded like the model and each rank averages its own shards; under
ZeRO-3 `update(model, gather)` makes one module at a time whole (`deepspeed.zero.GatheredParameters`).

Warm-up (`warmup=True`, `train.ema_warmup`): the n-th update uses min(decay, (1 + n) / (10 + n)), so
the copy follows the model early on instead of holding decay^n of its initial weights.

Checkpoint format: `state_dict()` is `{"decay", "warmup", "num_updates", "model": weights()}`. For
safetensors, save `weights()` (plain tensors) with `safetensors.torch.save_file` and `meta()` as JSON,
then restore with `load_state_dict({**meta, "model": weights})`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

# a context in which the given parameters are whole (ZeRO-3's GatheredParameters)
Gather = Callable[[list[Tensor]], contextlib.AbstractContextManager]


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_decay(decay: float) -> float:
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
    return float(decay)


class EMA:
    """A frozen copy of `model` that moves towards `param` by a fraction 1 - decay after each step.

    `dtype` (e.g. torch.float32 for a bf16 model) sets the floating-point dtype of the copy; the
    averaging is done in that dtype. Buffers are copied, not averaged. The copy is in eval mode, never
    requires grad, and changes only through `update` / `load_state_dict`.
    """

    def __init__(
        self, model: nn.Module, decay: float, dtype: torch.dtype | None = None, warmup: bool = False
    ) -> None:
        self.decay = _check_decay(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.model: nn.Module = copy.deepcopy(unwrap(model)).eval()
        if dtype is not None:
            self.model.to(dtype=dtype)  # only floating-point tensors are converted
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.grad = None
        # names only: FSDP2 replaces the parameter objects when the copy is sharded
        self._names = [name for name, _ in self.model.named_parameters()]
        self._buffer_names = [name for name, _ in self.model.named_buffers()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the EMA model (callers wrap it in `torch.no_grad()` as needed)."""
        return self.model(*args, **kwargs)

    def _check_names(self, src: nn.Module) -> None:
        for kind, names, theirs in (
            ("parameters", self._names, [n for n, _ in src.named_parameters()]),
            ("buffers", self._buffer_names, [n for n, _ in src.named_buffers()]),
        ):
            if theirs != names:
                missing = sorted(set(names) - set(theirs))[:5]
                extra = sorted(set(theirs) - set(names))[:5]
                raise ValueError(
                    f"EMA update: model {kind} do not match the EMA copy (missing {missing}, unexpected "
                    f"{extra}, {len(theirs)} vs {len(names)} names)"
                )

    @staticmethod
    def _check_shapes(kind: str, pairs: list[tuple[str, Tensor, Tensor]]) -> None:
        for name, mine, theirs in pairs:
            if mine.shape != theirs.shape:
                shapes = f"{tuple(theirs.shape)}, EMA has {tuple(mine.shape)}"
                raise ValueError(f"EMA update: {kind} {name} has shape {shapes}")

    def current_decay(self) -> float:
        """The decay of the next update: `decay`, or with warm-up min(decay, (1 + n) / (10 + n)) after n
        updates, so that a short run does not keep decay^n of the initial weights (README, EMA pitfall)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, gather: Gather | None = None) -> None:
        """Move the EMA towards `model` (bare or wrapped) by one step; call after each optimizer step.

        Sharded parameters (FSDP2 DTensors, sharded like the copy) are averaged shard by shard on each
        rank, without a gather. `gather` (ZeRO-3: a context that makes the given parameters whole) runs
        the update one module at a time (each block, then the rest), so that at most one block is whole."""
        src = unwrap(model)
        self._check_names(src)
        mine = dict(self.model.named_parameters())
        weight = 1.0 - self.current_decay()
        for part in _parts(src) if gather is not None else [list(src.named_parameters())]:
            with gather([p for _, p in part]) if gather is not None else contextlib.nullcontext():
                pairs = [(name, mine[name], p) for name, p in part]
                self._check_shapes("parameter", pairs)
                if pairs:
                    dst = [_local(e) for _, e, _ in pairs]
                    got = [
                        _local(p.detach()).to(device=d.device, dtype=d.dtype)
                        for (_, _, p), d in zip(pairs, dst, strict=True)
                    ]
                    torch._foreach_lerp_(dst, got, weight)
        buffers = dict(self.model.named_buffers())
        pairs = [(name, buffers[name], b) for name, b in src.named_buffers()]
        self._check_shapes("buffer", pairs)
        for _, e, b in pairs:
            e.copy_(b)
        self.num_updates += 1

    def weights(self) -> dict[str, Tensor]:
        """The EMA model's state dict (live tensors, no copy; safetensors-saveable as is)."""
        return self.model.state_dict()

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable counters: decay, warm-up and number of updates."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def state_dict(self) -> dict[str, Any]:
        """`meta()` plus the weights under "model"."""
        return {**self.meta(), "model": self.weights()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights (strictly, by name), decay and num_updates from `state_dict()`."""
        self.model.load_state_dict(state["model"], strict=True)
        self.load_meta(state)

    def load_meta(self, state: dict[str, Any]) -> None:
        """Restore decay, warm-up and num_updates (the weights are loaded elsewhere: FSDP2 shards)."""
        self.decay = _check_decay(state["decay"])
        self.warmup = bool(state.get("warmup", False))  # checkpoints from before warm-up existed: off
        self.num_updates = int(state["num_updates"])


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the DTensor); a tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _parts(module: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The module's named parameters in groups: each element of a ModuleList child (a block), each
    other child, then the module's own parameters."""
    parts = []
    for child_name, child in module.named_children():
        units = (
            [(f"{child_name}.{i}", b) for i, b in enumerate(child)]
            if isinstance(child, nn.ModuleList)
            else [(child_name, child)]
        )
        for prefix, unit in units:
            parts.append([(f"{prefix}.{n}", p) for n, p in unit.named_parameters()])
    parts.append(list(module.named_parameters(recurse=False)))
    return [part for part in parts if part]


def make_emas(
    model: nn.Module,
    eval_decay: float,
    teacher_decay: float | None = None,
    dtype: torch.dtype | None = None,
    warmup: bool = False,
) -> tuple[EMA, EMA]:
    """(eval_ema, teacher_ema): one shared object unless `teacher_decay` differs from `eval_decay`."""
    eval_ema = EMA(model, eval_decay, dtype, warmup)
    if teacher_decay is None or float(teacher_decay) == eval_ema.decay:
        return eval_ema, eval_ema
    return eval_ema, EMA(model, teacher_decay, dtype, warmup)


def update_all(emas: Iterable[EMA], model: nn.Module, gather: Gather | None = None) -> None:
    """Update each distinct EMA once (a shared teacher/eval EMA is stepped a single time)."""
    seen: set[int] = set()
    for ema in emas:
        if id(ema) not in seen:
            seen.add(id(ema))
            ema.update(model, gather)
