"""Invariants of the objectives: level marginals, mask ratios, the teacher's view, limits that coincide."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import randomize
from test_flow import _ks
from test_model import joint_batch

from selfflow.configs.factory import build_model
from selfflow.models import flow
from selfflow.models.timesteps import TimestepDist
from selfflow.training.objectives import (
    OBJECTIVES,
    Batch,
    Models,
    _common_draws,
    alignment_layers,
    draw_second_level,
    make_head,
)


def setup(cfg, name: str, seed: int = 0):
    student = randomize(build_model(cfg), seed).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    d = student.params.hidden_size
    encoder = None
    if name == "repa":
        proj = torch.nn.ModuleDict(
            {m: torch.nn.Linear(cfg.spec.token_dim(m), 16) for m in ("video", "audio")}
        )
        encoder = lambda media: torch.cat([proj[m](x) for m, x in media.items()], 1)  # noqa: E731
    head = make_head(name, d, 16)
    return Models(student, head, teacher, encoder)


def batch_for(cfg, b: int = 2, task: str = "av") -> Batch:
    media, ids, txt = joint_batch(cfg, batch=b)
    return Batch(media, ids, txt, None, task)


def capture(module, store: list):
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: store.append((args, kwargs)), with_kwargs=True
    )


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_gives_finite_loss_and_gradients(tiny_cfg, name):
    models = setup(tiny_cfg, name)
    cfg = replace(tiny_cfg.objective, name=name)
    out = OBJECTIVES[name](models, batch_for(tiny_cfg), torch.Generator().manual_seed(0), cfg)
    assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    grads = [p.grad for p in models.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in models.teacher.parameters())  # nothing reaches the teacher
    if models.head is not None:
        assert all(p.grad is not None for p in models.head.parameters())
    assert {"loss", "loss_gen", "loss_rep"} <= set(out.metrics)


def test_self_flow_with_zero_gamma_equals_dts_only(tiny_cfg):
    models = setup(tiny_cfg, "self_flow")
    a = OBJECTIVES["self_flow"](
        models, batch_for(tiny_cfg), torch.Generator().manual_seed(5), replace(tiny_cfg.objective, gamma=0.0)
    )
    b = OBJECTIVES["dts_only"](
        models, batch_for(tiny_cfg), torch.Generator().manual_seed(5), tiny_cfg.objective
    )
    assert torch.equal(a.loss, b.loss) and torch.equal(a.levels, b.levels)


def test_dts_only_without_masking_equals_vanilla(tiny_cfg):
    models = setup(tiny_cfg, "vanilla")
    no_mask = replace(tiny_cfg.objective, mask_ratio={"image": 0.0, "video": 0.0, "audio": 0.0})
    a = OBJECTIVES["dts_only"](models, batch_for(tiny_cfg), torch.Generator().manual_seed(2), no_mask)
    b = OBJECTIVES["vanilla"](models, batch_for(tiny_cfg), torch.Generator().manual_seed(2), no_mask)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.levels[:, 0], b.levels[:, 0])


def test_teacher_sees_the_cleaner_level_and_stops_at_block_k(tiny_cfg):
    models = setup(tiny_cfg, "self_flow")
    student_calls, teacher_calls, teacher_blocks = [], [], []
    hooks = [capture(models.student, student_calls), capture(models.teacher, teacher_calls)]
    blocks = [*models.teacher.double_blocks, *models.teacher.single_blocks]
    hooks += [
        b.register_forward_hook(lambda *a, n=n: teacher_blocks.append(n)) for n, b in enumerate(blocks, 1)
    ]
    cfg = replace(tiny_cfg.objective, caption_dropout=0.5)
    out = OBJECTIVES["self_flow"](models, batch_for(tiny_cfg, b=8), torch.Generator().manual_seed(1), cfg)
    for h in hooks:
        h.remove()
    (s_args, s_kw), (t_args, t_kw) = student_calls[0], teacher_calls[0]
    t, s = out.levels[:, 0], out.levels[:, 1]
    _, k = alignment_layers(models.student.params.depth)
    assert torch.equal(t_args[2], torch.minimum(t, s))  # tau_min, one level for every teacher token
    assert t_kw["stop_after"] == k and teacher_blocks == list(range(1, k + 1))
    assert t_kw.get("txt_t") is None  # the teacher's text stream follows its (scalar) level tau_min
    assert torch.equal(s_kw["txt_t"], t)  # the student's text stream uses the base level t
    assert torch.equal(s_kw["drop_txt"], t_kw["drop_txt"]) and s_kw["drop_txt"].any()  # same CFG decision
    # the teacher saw the same x0 and eps as the student, noised uniformly at tau_min
    batch = batch_for(tiny_cfg, b=8)
    _, eps, _ = _common_draws(batch, torch.Generator().manual_seed(1), cfg)
    per_token = s_args[2].gather(1, s_kw["t_index"]).split([x.shape[1] for x in batch.media.values()], dim=1)
    for (m, x0), tau in zip(batch.media.items(), per_token, strict=True):
        torch.testing.assert_close(t_args[0][m], flow.interpolate(x0, eps[m], torch.minimum(t, s)))
        torch.testing.assert_close(s_args[0][m], flow.interpolate(x0, eps[m], tau))


def test_token_levels_follow_p_t_and_the_mask_ratios(tiny_cfg):
    dist = TimestepDist("logit_normal", mu=0.3, sigma=1.2, shift=2.0)
    cfg = replace(tiny_cfg.objective, timesteps={k: dist for k in ("image", "video", "audio", "av")})
    n = 6000  # samples; a cheap batch of 1-channel tokens: 20 video + 10 audio per sample
    batch = Batch(
        {"video": torch.zeros(n, 20, 1), "audio": torch.zeros(n, 10, 1)},
        torch.zeros(30, 4),
        torch.zeros(n, 4, dtype=torch.long),
        None,
        "av",
    )
    gen = torch.Generator().manual_seed(0)
    t = dist.sample((n,), generator=gen)
    s, mask = draw_second_level(batch, t, gen, cfg)
    tau = torch.stack([t, s], 1).gather(1, mask.long())  # [n, 30] per-token levels
    for token in (0, 25):  # one token per sample: i.i.d. across samples, so its marginal must be p(t)
        assert _ks(tau[:, token], dist) < 0.025
    assert _ks(s, dist) < 0.025 and (s > t).float().mean().item() == pytest.approx(0.5, abs=0.03)  # unsorted
    assert mask[:, :20].float().mean().item() == pytest.approx(0.1, abs=0.01)  # video R_M
    assert mask[:, 20:].float().mean().item() == pytest.approx(0.5, abs=0.01)  # audio R_M
    # a joint sample's video and audio tokens share one (t, s) pair
    assert all(
        set(row.tolist()) <= {a, b}
        for row, a, b in zip(tau[:50], t[:50].tolist(), s[:50].tolist(), strict=True)
    )


def test_student_receives_exactly_the_drawn_levels(tiny_cfg):
    models, calls = setup(tiny_cfg, "dts_only"), []
    hook = capture(models.student, calls)
    batch = batch_for(tiny_cfg, b=4)
    OBJECTIVES["dts_only"](models, batch, torch.Generator().manual_seed(3), tiny_cfg.objective)
    hook.remove()
    gen = torch.Generator().manual_seed(3)
    t, _, _ = _common_draws(batch, gen, tiny_cfg.objective)
    s, mask = draw_second_level(batch, t, gen, tiny_cfg.objective)
    args, kw = calls[0]
    assert torch.equal(args[2], torch.stack([t, s], 1)) and torch.equal(kw["t_index"], mask.long())


def test_sra_teacher_is_at_most_max_gap_cleaner(tiny_cfg):
    models = setup(tiny_cfg, "sra")
    calls = []
    hook = capture(models.teacher, calls)
    out = OBJECTIVES["sra"](
        models, batch_for(tiny_cfg, b=16), torch.Generator().manual_seed(0), tiny_cfg.objective
    )
    hook.remove()
    t, t_teacher = out.levels[:, 0], calls[0][0][2]
    gap = t - t_teacher
    assert bool((gap >= 0).all()) and bool((gap <= 0.2 + 1e-6).all()) and bool((t_teacher >= 0).all())
