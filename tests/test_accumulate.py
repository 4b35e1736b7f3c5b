"""Gradient accumulation (`train.grad_accum`) and `train.compile` in one process."""

from __future__ import annotations

import pytest
import torch
from test_distributed import small_cfg

import selfflow.training.objectives as objectives
from selfflow.training.loop import build_trainer, make_batch
from selfflow.training.step import train_step


def _pixels(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1


class FixedDraws:
    """The objective's random draws (t, noise, caption dropout) for 2B samples fixed in advance and handed
    out in order, so that one batch of 2B and two micro-batches of B see the same draws per sample."""

    def __init__(self, batch, n: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.t = torch.rand(n, generator=g)
        self.eps = {m: torch.randn((n, *x.shape[1:]), generator=g) for m, x in batch.media.items()}
        self.drop = torch.rand(n, generator=g) < 0.5
        self.offset = 0

    def __call__(self, batch, gen, cfg):
        b, lo = batch.txt.shape[0], self.offset
        self.offset += b
        return self.t[lo : lo + b], {m: e[lo : lo + b] for m, e in self.eps.items()}, self.drop[lo : lo + b]


def test_two_micro_batches_of_b_equal_one_batch_of_2b(shards, tmp_path, monkeypatch):
    """vanilla, B = 2: grad_accum over [x0, x1] and [x2, x3] gives the step (weights, EMA, grad norm) of
    one batch [x0..x3] with the same per-sample draws, to fp32 rounding."""
    cfg = small_cfg(shards, tmp_path, "objective.name=vanilla", "train.grad_accum=2", "train.grad_clip=0.05")
    captions = [f"pattern number {i}" for i in range(4)]
    results = []
    for split in (True, False):
        tr = build_trainer(cfg, "cpu")
        whole = make_batch(tr, {"image": _pixels(4)}, captions)
        monkeypatch.setattr(objectives, "_common_draws", FixedDraws(whole, 4))
        if split:
            micro = [make_batch(tr, {"image": _pixels(4)[i : i + 2]}, captions[i : i + 2]) for i in (0, 2)]
            out = train_step(tr, micro)
        else:
            out = train_step(tr, whole)
        results.append((out, tr.models.student.state_dict(), tr.ema.weights(), tr.samples_seen))
    (split, w_split, e_split, n_split), (one, w_one, e_one, n_one) = results
    assert n_split == n_one == 4 and split.loss.shape == one.loss.shape == (4,)
    torch.testing.assert_close(split.loss, one.loss)
    torch.testing.assert_close(split.metrics["grad_norm"], one.metrics["grad_norm"], rtol=1e-5, atol=1e-7)
    assert split.metrics["grad_norm"] > 0.05  # the clip is active: it sees the accumulated gradient
    fresh = build_trainer(cfg, "cpu").models.student.state_dict()
    assert any(not torch.equal(fresh[k], w_one[k]) for k in fresh)
    for k in w_one:
        torch.testing.assert_close(w_split[k], w_one[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(e_split[k], e_one[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(shards, tmp_path):
    """train.compile=true compiles each block's forward with inductor (on the CPU here); two Self-Flow steps
    give the losses and weights of the eager model, and the parameter names do not change."""
    captions = [f"pattern number {i}" for i in range(2)]
    runs = []
    for compiled in (False, True):
        tr = build_trainer(small_cfg(shards, tmp_path, f"train.compile={compiled}"), "cpu")
        batch = make_batch(tr, {"image": _pixels(2)}, captions)
        losses = [train_step(tr, batch).loss for _ in range(2)]
        runs.append((tr, losses))
    (eager, eager_losses), (comp, comp_losses) = runs
    block = comp.models.student.double_blocks[0]
    assert hasattr(block.forward, "_torchdynamo_orig_callable")  # what torch.compile returns
    assert not hasattr(eager.models.student.double_blocks[0].forward, "_torchdynamo_orig_callable")
    for a, b in zip(eager_losses, comp_losses, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    w_eager, w_comp = eager.models.student.state_dict(), comp.models.student.state_dict()
    assert w_eager.keys() == w_comp.keys()
    for k in w_eager:
        torch.testing.assert_close(w_eager[k], w_comp[k], rtol=1e-4, atol=1e-5, msg=k)
