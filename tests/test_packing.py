"""Sequence packing in the model: samples of any modalities in one row compute what they compute alone."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize

from selfflow.configs.factory import model_params
from selfflow.models.mmdit import MMDiT
from selfflow.models.packing import Sample, pack_samples, unpack_media
from selfflow.tokenizers.media import MediaTokenizer


def _sample(cfg, mods: tuple[str, ...], caption_len: int, drop: bool, seed: int) -> Sample:
    gen = torch.Generator().manual_seed(seed)
    spec = cfg.spec
    media = {m: torch.randn(1, spec.tokens(m), spec.token_dim(m), generator=gen) for m in mods}
    ids = MediaTokenizer(spec).position_ids(list(mods))
    n = ids.shape[0]
    txt = torch.randint(3, 259, (1, cfg.text.max_len), generator=gen)
    mask = torch.arange(cfg.text.max_len)[None] < caption_len
    t = torch.rand(1, 2, generator=gen)  # Self-Flow's two levels: t and s
    t_index = (torch.rand(1, n, generator=gen) < 0.4).long()  # tokens at s
    return Sample(media, ids, txt, mask, t, t_index, torch.tensor([drop]))


def test_a_packed_row_of_image_av_and_audio_equals_each_sample_alone(tiny_cfg):
    """Velocity and hidden states per token of an image, a clip with its sound (the second caption
    dropped for CFG) and a sound, packed in one row, equal those of each sample in its own batch."""
    model = randomize(MMDiT(model_params(tiny_cfg)), seed=4).eval()
    samples = [
        _sample(tiny_cfg, ("image",), 7, False, 0),
        _sample(tiny_cfg, ("video", "audio"), 12, True, 1),
        _sample(tiny_cfg, ("audio",), 3, False, 2),
    ]
    media, ids, txt, mask, packed, t, t_index, drop = pack_samples(samples)
    assert t.shape == (1, 6) and txt.shape == (1, 3 * tiny_cfg.text.max_len)
    with torch.no_grad():
        out = model(media, ids, t, txt, t_index=t_index, txt_mask=mask, drop_txt=drop, packed=packed,
                    return_hidden=(2,))  # fmt: skip
        for s, got in zip(samples, unpack_media(out.velocity, samples), strict=True):
            alone = model(s.media, s.ids, s.t, s.txt, t_index=s.t_index, txt_t=s.t[:, 0], txt_mask=s.mask,
                          drop_txt=s.drop)  # fmt: skip
            assert got.keys() == alone.velocity.keys()
            for m, v in alone.velocity.items():
                torch.testing.assert_close(got[m], v, atol=1e-5, rtol=1e-4)
    assert out.hidden[2].shape[1] == sum(x.shape[1] for x in media.values())


def test_packing_a_single_sample_changes_nothing(tiny_cfg):
    model = randomize(MMDiT(model_params(tiny_cfg)), seed=5).eval()
    s = _sample(tiny_cfg, ("video", "audio"), 9, False, 3)
    media, ids, txt, mask, packed, t, t_index, drop = pack_samples([s])
    with torch.no_grad():
        out = model(media, ids, t, txt, t_index=t_index, txt_mask=mask, drop_txt=drop, packed=packed)
        alone = model(s.media, s.ids, s.t, s.txt, t_index=s.t_index, txt_t=s.t[:, 0], txt_mask=s.mask)
    for m, v in alone.velocity.items():
        torch.testing.assert_close(out.velocity[m], v, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- objectives over packed rows

TASKS = (("image", ("image",)), ("av", ("video", "audio")), ("audio", ("audio",)))


class Draws:
    """Each sample's random draws fixed in advance, handed to the objective for the packed row or for
    one sample alone (`current`), so that both see the same t, s, noise, dropout, token mask and gap."""

    def __init__(self, samples, cfg) -> None:
        gen = torch.Generator().manual_seed(11)
        self.samples, self.current = samples, None
        self.t, self.s, self.gap = (torch.rand(len(samples), generator=gen) for _ in range(3))
        self.drop = torch.tensor([False, True, False])
        self.eps = [{m: torch.randn(x.shape, generator=gen) for m, x in s.media.items()} for s in samples]
        self.mask = [
            {m: torch.rand(x.shape[:2], generator=gen) < 0.4 for m, x in s.media.items()} for s in samples
        ]

    def _pick(self, per_sample: list[dict]) -> dict:
        if self.current is not None:
            return per_sample[self.current]
        order = list(dict.fromkeys(m for d in per_sample for m in d))
        return {m: torch.cat([d[m] for d in per_sample if m in d], dim=1) for m in order}

    def _one(self, values):
        return values if self.current is None else values[self.current : self.current + 1]

    def common(self, batch, gen, cfg):
        return self._one(self.t), self._pick(self.eps), self._one(self.drop)

    def second(self, batch, t, gen, cfg):
        return self._one(self.s), torch.cat(list(self._pick(self.mask).values()), dim=1)

    def gap_of(self, t, gen, cfg):
        return self._one(self.gap) * cfg.sra_max_gap


@pytest.mark.parametrize("name", ["vanilla", "dts_only", "self_flow", "sra", "repa"])
def test_every_objective_gives_a_packed_sample_the_loss_it_has_alone(tiny_cfg, monkeypatch, name):
    """Per-sample losses (and velocity losses) of an image, an AV clip and a sound packed in one row
    equal those of each sample in its own batch, with the same draws, to fp32 tolerance."""
    import selfflow.training.objectives as objectives
    from selfflow.configs import load_config

    cfg = load_config("tiny", [f"objective.name={name}"]).objective
    student = randomize(MMDiT(model_params(tiny_cfg)), seed=6).eval()
    teacher = randomize(MMDiT(model_params(tiny_cfg)), seed=7).eval()
    head = objectives.make_head(name, student.params.hidden_size, 16)
    torch.manual_seed(0)
    proj = {m: torch.nn.Linear(tiny_cfg.spec.token_dim(m), 16) for m in ("image", "video", "audio")}

    def encoder(media):  # per token, plus each sample's mean: packing must hand it whole samples
        return torch.cat([proj[m](x) + proj[m](x).mean(1, keepdim=True) for m, x in media.items()], 1)

    models = objectives.Models(student, head, teacher, encoder)
    samples = [_sample(tiny_cfg, mods, 5 + 4 * i, False, 20 + i) for i, (_, mods) in enumerate(TASKS)]
    draws = Draws(samples, cfg)
    monkeypatch.setattr(objectives, "_common_draws", draws.common)
    monkeypatch.setattr(objectives, "draw_second_level", draws.second)
    monkeypatch.setattr(objectives, "draw_gap", draws.gap_of)
    media, ids, txt, mask, packed, _, _, _ = pack_samples(samples)
    tasks = tuple(task for task, _ in TASKS)
    row = objectives.Batch(media, ids, txt, mask, packed=packed, sample_tasks=tasks)
    gen = torch.Generator()
    with torch.no_grad():
        out = objectives.OBJECTIVES[name](models, row, gen, cfg)
        assert out.loss.shape == (3,)
        for i, (s, (task, _)) in enumerate(zip(samples, TASKS, strict=True)):
            draws.current = i
            alone = objectives.OBJECTIVES[name](
                models, objectives.Batch(s.media, s.ids, s.txt, s.mask, task), gen, cfg
            )
            torch.testing.assert_close(out.loss[i : i + 1], alone.loss, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.loss_gen[i : i + 1], alone.loss_gen, atol=1e-5, rtol=1e-4)
            draws.current = None
