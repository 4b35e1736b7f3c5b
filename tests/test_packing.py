"""Sequence packing in the model: samples of any modalities in one row compute what they compute alone."""

from __future__ import annotations

import torch
from conftest import randomize

from selfflow.models.factory import model_params
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
