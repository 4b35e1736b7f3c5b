"""The joint transformer: shapes, per-token levels, hidden-state taps, early stop, text paths, init."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import randomize

from selfflow.configs.factory import model_params
from selfflow.models.layers import apply_rope, distinct_levels, rope_angles
from selfflow.models.mmdit import MMDiT
from selfflow.tokenizers.media import MediaTokenizer


def joint_batch(cfg, batch: int = 2, seed: int = 0):
    """Text ids + video + audio tokens of the tiny preset, with their position ids."""
    gen = torch.Generator().manual_seed(seed)
    spec = cfg.spec
    media = {
        "video": torch.randn(batch, spec.tokens("video"), spec.token_dim("video"), generator=gen),
        "audio": torch.randn(batch, spec.tokens("audio"), spec.token_dim("audio"), generator=gen),
    }
    ids = MediaTokenizer(spec).position_ids(list(media))
    txt = torch.randint(3, 259, (batch, cfg.text.max_len), generator=gen)
    return media, ids, txt


def test_joint_forward_shapes_and_hidden_states(tiny_cfg, tiny_model):
    media, ids, txt = joint_batch(tiny_cfg)
    n = sum(x.shape[1] for x in media.values())
    out = tiny_model(media, ids, torch.rand(2), txt, return_hidden=(1, 2, 4))
    assert {m: v.shape for m, v in out.velocity.items()} == {m: x.shape for m, x in media.items()}
    assert sorted(out.hidden) == [1, 2, 4]
    assert all(h.shape == (2, n, tiny_model.params.hidden_size) for h in out.hidden.values())
    assert all(torch.isfinite(v).all() for v in out.velocity.values())


def test_stop_after_returns_only_what_is_needed_and_skips_blocks(tiny_cfg, tiny_model):
    media, ids, txt = joint_batch(tiny_cfg)
    t = torch.rand(2)
    full = tiny_model(media, ids, t, txt, return_hidden=(1, 3))
    calls = []
    blocks = [*tiny_model.double_blocks, *tiny_model.single_blocks]
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, b in enumerate(blocks, 1)]
    final_calls = []
    hooks.append(tiny_model.final.register_forward_hook(lambda *a: final_calls.append(1)))
    try:
        early = tiny_model(media, ids, t, txt, return_hidden=(1, 3), stop_after=3)
    finally:
        for h in hooks:
            h.remove()
    assert early.velocity is None and sorted(early.hidden) == [1, 3]
    assert calls == [1, 2, 3] and not final_calls  # block 4 and the output layer never ran
    for k in (1, 3):
        assert torch.equal(early.hidden[k], full.hidden[k])
    with pytest.raises(ValueError, match="outside blocks"):
        tiny_model(media, ids, t, txt, return_hidden=(4,), stop_after=3)
    with pytest.raises(ValueError, match="stop_after"):
        tiny_model(media, ids, t, txt, stop_after=5)


def test_equal_per_token_levels_give_exactly_the_scalar_output(tiny_cfg, tiny_model):
    media, ids, txt = joint_batch(tiny_cfg)
    n = sum(x.shape[1] for x in media.values())
    t = torch.tensor([0.3, 0.8])
    scalar = tiny_model(media, ids, t, txt)
    per_token = tiny_model(media, ids, t[:, None].expand(2, n), txt, txt_t=t)
    for m in media:
        assert torch.equal(scalar.velocity[m], per_token.velocity[m])
    # the gather path with two identical levels agrees too (to rounding of a different matmul shape)
    index = torch.randint(0, 2, (2, n))
    gathered = tiny_model(media, ids, t[:, None].expand(2, 2), txt, t_index=index, txt_t=t)
    for m in media:
        torch.testing.assert_close(gathered.velocity[m], scalar.velocity[m], atol=1e-5, rtol=1e-5)


def test_two_level_forms_agree_and_levels_matter(tiny_cfg, tiny_model):
    media, ids, txt = joint_batch(tiny_cfg)
    n = sum(x.shape[1] for x in media.values())
    levels = torch.tensor([[0.9, 0.2], [0.1, 0.6]])  # unsorted pairs, as Self-Flow draws them
    index = (torch.rand(2, n, generator=torch.Generator().manual_seed(1)) < 0.25).long()
    per_token = levels.gather(1, index)  # [B, L]
    a = tiny_model(media, ids, levels, txt, t_index=index, txt_t=levels[:, 0])
    b = tiny_model(media, ids, per_token, txt, txt_t=levels[:, 0])
    scalar = tiny_model(media, ids, levels[:, 0], txt)
    for m in media:
        torch.testing.assert_close(a.velocity[m], b.velocity[m], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a.velocity[m], scalar.velocity[m], atol=1e-3)
    with pytest.raises(ValueError, match="txt_t"):
        tiny_model(media, ids, per_token, txt)


def test_distinct_levels():
    t = torch.tensor([[0.5, 0.2, 0.5, 0.2], [0.7, 0.7, 0.7, 0.7]])
    levels, index = distinct_levels(t)
    assert levels.shape == (2, 2)
    assert torch.equal(levels.gather(1, index), t)
    assert torch.equal(levels[0], torch.tensor([0.2, 0.5]))


def test_fresh_model_starts_at_zero_velocity(tiny_cfg):
    model = MMDiT(model_params(tiny_cfg))
    media, ids, txt = joint_batch(tiny_cfg)
    out = model(media, ids, torch.rand(2), txt)
    assert all(torch.count_nonzero(v) == 0 for v in out.velocity.values())
    assert all(torch.count_nonzero(p) == 0 for p in model.img_mod.parameters())  # adaLN-Zero gates


def test_null_caption_ignores_the_caption_and_padding_is_masked(tiny_cfg, tiny_model):
    media, ids, txt = joint_batch(tiny_cfg)
    t, drop = torch.rand(2), torch.tensor([True, False])
    other_txt = torch.randint(3, 259, txt.shape, generator=torch.Generator().manual_seed(9))
    a = tiny_model(media, ids, t, txt, drop_txt=drop)
    b = tiny_model(media, ids, t, other_txt, drop_txt=drop)
    mask = torch.ones_like(txt, dtype=torch.bool)
    mask[:, 10:] = False
    c = tiny_model(media, ids, t, other_txt, drop_txt=drop, txt_mask=mask)
    for m in media:
        torch.testing.assert_close(a.velocity[m][0], b.velocity[m][0])  # dropped: caption-independent
        torch.testing.assert_close(a.velocity[m][0], c.velocity[m][0])  # ... and length-independent
        assert not torch.allclose(a.velocity[m][1], b.velocity[m][1])  # kept: the caption matters
    # padded positions do not influence a sample when masked
    padded = txt.clone()
    padded[:, 10:] = 0
    d = tiny_model(media, ids, t, txt, txt_mask=mask)
    e = tiny_model(media, ids, t, padded, txt_mask=mask)
    for m in media:
        torch.testing.assert_close(d.velocity[m], e.velocity[m])


def test_batch_independence(tiny_cfg, tiny_model):
    media, ids, txt = joint_batch(tiny_cfg, batch=3)
    t = torch.rand(3)
    full = tiny_model(media, ids, t, txt)
    single = tiny_model({m: x[1:2] for m, x in media.items()}, ids, t[1:2], txt[1:2])
    for m in media:
        torch.testing.assert_close(full.velocity[m][1:2], single.velocity[m], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg):
    media, ids, txt = joint_batch(tiny_cfg)
    t = torch.rand(2)
    grads = []
    for ckpt in (False, True):
        model = randomize(MMDiT(replace(model_params(tiny_cfg), grad_checkpointing=ckpt))).train()
        out = model(media, ids, t, txt)
        sum(v.pow(2).mean() for v in out.velocity.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_image_only_and_audio_only_batches(tiny_cfg, tiny_model):
    spec = tiny_cfg.spec
    tok = MediaTokenizer(spec)
    for m in ("image", "audio"):
        media = {m: torch.randn(2, spec.tokens(m), spec.token_dim(m))}
        out = tiny_model(media, tok.position_ids([m]), torch.rand(2), torch.randint(3, 259, (2, 8)))
        assert out.velocity[m].shape == media[m].shape
    with pytest.raises(ValueError, match="not in the model"):
        tiny_model(
            {"depth": torch.randn(2, 4, 8)}, torch.zeros(4, 4), torch.rand(2), torch.zeros(2, 8).long()
        )


def test_text_from_a_frozen_encoder_feeds_the_text_stream(tiny_cfg):
    params = replace(model_params(tiny_cfg), txt_vocab_size=0, txt_feature_dim=32)
    model = randomize(MMDiT(params)).eval()
    media, ids, _ = joint_batch(tiny_cfg)
    out = model(media, ids, torch.rand(2), torch.randn(2, 7, 32))
    assert out.velocity["video"].shape == media["video"].shape
    with pytest.raises(ValueError, match="features"):
        model(media, ids, torch.rand(2), torch.zeros(2, 7, dtype=torch.long))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_heads": 5}, "not divisible"),
        ({"axes_dim": (12, 12, 12, 14)}, "axes_dim"),
        ({"depth_double": 0, "depth_single": 0}, "depths"),
        ({"txt_feature_dim": 16}, "exactly one"),
        ({"media_channels": {}}, "media_channels"),
        ({"attn_backend": "nope"}, "unknown attention backend"),
        ({"prediction": "eps"}, "prediction"),
    ],
)
def test_invalid_params_raise(tiny_cfg, change, message):
    with pytest.raises(ValueError, match=message):
        MMDiT(replace(model_params(tiny_cfg), **change))


def test_rope_depends_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 5, 16, generator=gen), torch.randn(1, 1, 5, 16, generator=gen)
    pos = torch.tensor([0.0, 1.0, 2.5, 7.0, 40.0])

    def scores(offset: float):
        cos, sin = rope_angles(pos + offset, 16, 10_000.0)
        pe = (cos[None, None], sin[None, None])
        return apply_rope(q, pe) @ apply_rope(k, pe).transpose(-1, -2)

    torch.testing.assert_close(scores(0.0), scores(123.0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0.0), q @ k.transpose(-1, -2), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flash"])
def test_cuda_backends_match_sdpa(tiny_cfg, backend):
    from selfflow.models.attention import backend_available

    if not backend_available("flash"):  # without flash-attn, auto is SDPA: nothing to compare
        pytest.skip("flash-attn not installed")
    media, ids, txt = joint_batch(tiny_cfg)
    media, ids, txt = {m: x.cuda().bfloat16() for m, x in media.items()}, ids.cuda(), txt.cuda()
    mask = torch.ones_like(txt, dtype=torch.bool)
    mask[1, 5:] = False  # a padded caption: the ragged path
    t, outs = torch.rand(2, device="cuda"), []
    for name in ("sdpa", backend):
        model = randomize(MMDiT(replace(model_params(tiny_cfg), attn_backend=name))).cuda().bfloat16().eval()
        outs.append(model(media, ids, t, txt, txt_mask=mask).velocity)
    for m in media:
        torch.testing.assert_close(outs[0][m].float(), outs[1][m].float(), atol=2e-2, rtol=2e-2)


def test_precomputed_condition_gives_the_same_velocity(tiny_cfg):
    """The sampler's cached caption / rotary work (`condition`) changes nothing, with and without CFG drop."""
    model = randomize(MMDiT(model_params(tiny_cfg)), seed=3).eval()
    media, ids, txt = joint_batch(tiny_cfg)
    mask = torch.ones_like(txt, dtype=torch.bool)
    mask[0, 10:] = False
    drop = torch.tensor([True, False])
    for d in (None, drop):
        for t in (torch.tensor([0.3, 0.8]), torch.tensor([0.9, 0.1])):
            cond = model.condition(ids, txt, mask, d)
            cached = model(media, ids, t, None, cond=cond).velocity
            direct = model(media, ids, t, txt, txt_mask=mask, drop_txt=d).velocity
            assert all(torch.equal(cached[m], direct[m]) for m in media)
    with pytest.raises(ValueError, match="precomputed cond"):
        model(media, ids, torch.rand(2), None)


def test_data_prediction_returns_the_velocity_its_output_implies(tiny_cfg):
    """prediction=data: the output layer gives x0 and forward returns (x_t - x0) / t per token, with
    each token's own level (JiT); the same weights with prediction=velocity return that x0 raw."""
    params = model_params(tiny_cfg)
    raw = randomize(MMDiT(params)).eval()
    data = MMDiT(replace(params, prediction="data")).eval()
    data.load_state_dict(raw.state_dict())
    media, ids, txt = joint_batch(tiny_cfg)
    n = sum(x.shape[1] for x in media.values())
    levels = torch.tensor([[0.9, 0.2], [0.1, 0.6]])
    index = (torch.rand(2, n, generator=torch.Generator().manual_seed(1)) < 0.3).long()
    per_token = levels.gather(1, index).split([x.shape[1] for x in media.values()], dim=1)
    for t, kw, tok_t in [
        (torch.tensor([0.3, 0.8]), {}, [torch.tensor([0.3, 0.8])[:, None]] * 2),
        (levels, {"t_index": index, "txt_t": levels[:, 0]}, per_token),
    ]:
        x0 = raw(media, ids, t, txt, **kw).velocity
        v = data(media, ids, t, txt, **kw).velocity
        for (m, x), tt in zip(media.items(), tok_t, strict=True):
            want = (x - x0[m]) / tt.expand(2, x.shape[1])[..., None]
            torch.testing.assert_close(v[m], want, atol=1e-5, rtol=1e-5)
