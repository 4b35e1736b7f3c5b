"""EMA of the weights: closed form, isolation from the student, checkpoints, wrappers, shared teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file, save_file
from torch import nn

from selfflow.configs.factory import build_model
from selfflow.training.ema import EMA, make_emas, update_all


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)  # has buffers (running stats, an int counter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


class Wrapper(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _small(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    return Small()


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.randn(b.shape, generator=gen))
            else:
                b.add_(1)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_closed_form_after_k_updates(dtype):
    model, decay, values = _small(), 0.9, [1.0, -2.0, 0.5, 3.0, 0.25]
    init = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay, dtype=dtype)
    for v in values:
        _set(model, v)
        ema.update(model)
    k = len(values)
    tail = sum((1 - decay) * decay ** (k - i) * v for i, v in enumerate(values, 1))
    for name, p in ema.model.named_parameters():
        assert p.dtype == (dtype or torch.float32)
        assert (p.double() - (decay**k * init[name] + tail)).abs().max() <= 1e-6, name
    assert ema.num_updates == k
    # buffers are copied, not averaged
    for b, ref in zip(ema.model.buffers(), model.buffers(), strict=True):
        assert torch.equal(b, ref.to(b.dtype))


def test_decay_zero_copies_exactly_and_decay_is_validated():
    model = _small()
    ema = EMA(model, 0.0)
    _perturb(model, 1)
    ema.update(model)
    for a, b in zip(ema.weights().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            EMA(model, bad)


def test_ema_is_frozen_and_changes_only_through_update():
    model = _small()
    ema = EMA(model, 0.5)
    assert not ema.model.training
    assert all(not p.requires_grad and p.grad is None for p in ema.model.parameters())
    before = {k: v.clone() for k, v in ema.weights().items()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 3)).square().sum().backward()
    opt.step()
    assert all(p.grad is None for p in ema.model.parameters())
    for k, v in ema.weights().items():
        assert torch.equal(v, before[k]), k  # neither the backward nor the step touched the EMA
    ema.update(model)
    assert not torch.equal(ema.model.lin.weight, before["lin.weight"])
    assert not ema.model.lin.weight.requires_grad


def test_state_dict_round_trip_reproduces_later_updates(tmp_path):
    model = _small(0)
    ema = EMA(model, 0.7)
    for s in range(3):
        _perturb(model, s)
        ema.update(model)
    path = tmp_path / "ema.safetensors"
    save_file(ema.weights(), str(path))
    state = {**ema.meta(), "model": load_file(str(path))}
    other = EMA(_small(1), 0.1)  # different weights and decay; both are restored
    other.load_state_dict(state)
    assert other.decay == 0.7 and other.num_updates == 3
    for s in (10, 11):
        _perturb(model, s)
        ema.update(model)
        other.update(model)
    assert other.num_updates == ema.num_updates == 5
    for k, v in ema.state_dict()["model"].items():
        assert torch.equal(v, other.weights()[k]), k


def test_wrapped_model_updates_like_the_bare_model_and_mismatch_raises():
    model = _small()
    bare, wrapped = EMA(model, 0.8), EMA(Wrapper(model), 0.8)
    assert list(wrapped.weights()) == list(bare.weights())  # no "module." prefix
    _perturb(model, 3)
    bare.update(model)
    wrapped.update(Wrapper(model))
    for k, v in bare.weights().items():
        assert torch.equal(v, wrapped.weights()[k])
    with pytest.raises(ValueError, match="do not match"):
        bare.update(nn.Linear(3, 4))
    wide = Small()
    wide.lin = nn.Linear(3, 4, bias=True)
    wide.lin.weight = nn.Parameter(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="shape"):
        bare.update(wide)
    assert bare.num_updates == 1


def test_make_emas_shares_or_separates_the_teacher():
    model = _small()
    ev, te = make_emas(model, 0.9)
    assert ev is te
    ev2, te2 = make_emas(model, 0.9, 0.9)
    assert ev2 is te2
    update_all([ev, te], model)
    assert ev.num_updates == 1
    ev3, te3 = make_emas(model, 0.99, 0.5)
    assert ev3 is not te3 and ev3.model is not te3.model
    _perturb(model, 4)
    update_all((ev3, te3), model)
    assert ev3.num_updates == te3.num_updates == 1
    assert not torch.equal(ev3.model.lin.weight, te3.model.lin.weight)


def test_ema_of_tiny_mmdit_matches_the_source_at_creation(tiny_cfg, tiny_model):
    from test_model import joint_batch

    ema = EMA(tiny_model, 0.9999)
    media, ids, txt = joint_batch(tiny_cfg)
    t = torch.rand(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(media, ids, t, txt).velocity
        out = ema(media, ids, t, txt).velocity
    assert ref is not None and out is not None
    for m in ref:
        assert torch.equal(out[m], ref[m])
    other = randomize(build_model(tiny_cfg), seed=1)
    ema.update(other)  # update on the real model class works and moves the weights
    assert ema.num_updates == 1
    assert not torch.equal(ema.model.null_txt, tiny_model.null_txt)


def test_warmup_follows_the_model_early_and_reaches_the_decay():
    model = torch.nn.Linear(3, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.99, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # n = 0: decay min(0.99, 1 / 10) = 0.1, so the copy moves 90 % of the way
    assert torch.allclose(ema.model.weight, torch.full((2, 3), 0.9))
    assert [round(d, 4) for d in _decays(ema, 3)] == [0.1818, 0.25, 0.3077]  # (1 + n) / (10 + n)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.warmup and restored.current_decay() == 0.99
    assert EMA(model, decay=0.99).current_decay() == 0.99  # off by default: the paper's recipe


def _decays(ema: EMA, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(ema.current_decay())
        ema.num_updates += 1
    return out


def test_a_gathered_update_runs_one_module_at_a_time_and_equals_the_plain_one(tiny_cfg, tiny_model):
    """With `gather` (ZeRO-3) every parameter passes through exactly one gather, each block by itself,
    so that at most one block's worth is whole at a time; the result equals the plain update."""
    import contextlib

    plain, gathered = EMA(tiny_model, 0.9), EMA(tiny_model, 0.9)
    other = randomize(build_model(tiny_cfg), seed=1)
    calls: list[list[torch.Tensor]] = []

    def gather(params):
        calls.append(params)
        return contextlib.nullcontext()

    plain.update(other)
    gathered.update(other, gather)
    assert all(torch.equal(plain.weights()[k], v) for k, v in gathered.weights().items())
    ids = [id(p) for params in calls for p in params]
    assert sorted(ids) == sorted(id(p) for p in other.parameters())  # each one once
    blocks = [*other.double_blocks, *other.single_blocks]
    assert all(
        any({id(p) for p in params} == {id(p) for p in b.parameters()} for params in calls) for b in blocks
    )
    largest, total = (
        max(sum(p.numel() for p in ps) for ps in calls),
        sum(p.numel() for p in other.parameters()),
    )
    assert largest <= max(sum(p.numel() for p in b.parameters()) for b in blocks) < total / 2
