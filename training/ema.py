"""Exponential moving average (EMA) of the model weights: Self-Flow's teacher and evaluation model.

Self-Flow keeps one EMA copy (decay 0.9999, updated after every optimizer step) that serves both as
the self-distillation teacher (a no-grad forward every step) and as the model that is evaluated. Short
runs may give the teacher its own, faster decay; `make_emas` then returns two copies, else one object
plays both roles.

Nothing here assumes sharding: under ZeRO-3 the caller gathers the full parameters (e.g. with
`deepspeed.zero.GatheredParameters`) before calling `EMA.update`.

Warm-up (`warmup=True`, `train.ema_warmup`): the n-th update uses min(decay, (1 + n) / (10 + n)), so
the copy follows the model early on instead of holding decay^n of its initial weights.

Checkpoint format: `state_dict()` is `{"decay", "warmup", "num_updates", "model": weights()}`. For
safetensors, save `weights()` (plain tensors) with `safetensors.torch.save_file` and `meta()` as JSON,
then restore with `load_state_dict({**meta, "model": weights})`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


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
        named = dict(self.model.named_parameters())
        self._names = list(named)
        self._params = list(named.values())
        buffers = dict(self.model.named_buffers())
        self._buffer_names = list(buffers)
        self._buffers = list(buffers.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the EMA model (callers wrap it in `torch.no_grad()` as needed)."""
        return self.model(*args, **kwargs)

    def _source(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters and buffers of `model`, in the EMA's order, after checking names and shapes."""
        src = unwrap(model)
        params, buffers = dict(src.named_parameters()), dict(src.named_buffers())
        for kind, names, mine, theirs in (
            ("parameters", self._names, self._params, params),
            ("buffers", self._buffer_names, self._buffers, buffers),
        ):
            if list(theirs) != names:
                missing = sorted(set(names) - set(theirs))[:5]
                extra = sorted(set(theirs) - set(names))[:5]
                raise ValueError(
                    f"EMA update: model {kind} do not match the EMA copy (missing {missing}, unexpected "
                    f"{extra}, {len(theirs)} vs {len(names)} names)"
                )
            for name, a, b in zip(names, mine, theirs.values(), strict=True):
                if a.shape != b.shape:
                    shapes = f"{tuple(b.shape)}, EMA has {tuple(a.shape)}"
                    raise ValueError(f"EMA update: {kind[:-1]} {name} has shape {shapes}")
        return list(params.values()), list(buffers.values())

    def current_decay(self) -> float:
        """The decay of the next update: `decay`, or with warm-up min(decay, (1 + n) / (10 + n)) after n
        updates, so that a short run does not keep decay^n of the initial weights (README, EMA pitfall)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA towards `model` (bare or wrapped) by one step; call after each optimizer step."""
        params, buffers = self._source(model)
        if self._params:
            pairs = zip(params, self._params, strict=True)
            src = [p.detach().to(device=e.device, dtype=e.dtype) for p, e in pairs]
            torch._foreach_lerp_(self._params, src, 1.0 - self.current_decay())
        for e, b in zip(self._buffers, buffers, strict=True):
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
        self.decay = _check_decay(state["decay"])
        self.warmup = bool(state.get("warmup", False))  # checkpoints from before warm-up existed: off
        self.num_updates = int(state["num_updates"])


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


def update_all(emas: Iterable[EMA], model: nn.Module) -> None:
    """Update each distinct EMA once (a shared teacher/eval EMA is stepped a single time)."""
    seen: set[int] = set()
    for ema in emas:
        if id(ema) not in seen:
            seen.add(id(ema))
            ema.update(model)
