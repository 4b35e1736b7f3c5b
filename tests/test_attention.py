"""Attention without a padding mask (models/attention.py): ragged attention equals masked attention at
the tokens that attend, one row or several sequences per row; padded captions change no media output;
the default configuration never passes a mask to SDPA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from test_model import joint_batch

from selfflow.configs.factory import model_params
from selfflow.models.attention import Ragged, attention, check_backend, ragged_rows
from selfflow.models.mmdit import MMDiT


def _masked_reference(q, k, v, allowed):
    """Softmax attention with allowed [B, N, N] (query, key) in plain torch: [B, N, H * Dh]."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, H, N, N]
    out = F.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1) @ v
    return out.transpose(1, 2).flatten(2)


def test_ragged_rows_equal_masked_attention_at_the_kept_tokens():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=gen, requires_grad=True) for _ in range(3))
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[1, 6:] = False
    keep[2, 2:5] = False  # padding in the middle of the row: the text part of [text; media]
    ragged = ragged_rows(keep)
    assert ragged is not None and ragged.max_len == 10 and ragged.offsets.tolist() == [0, 10, 16, 23]
    out = attention(q, k, v, ragged)
    ref = _masked_reference(q, k, v, keep[:, None, :].expand(-1, 10, -1))
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    out[keep].sum().backward()  # gradients flow through the gather, the jagged kernel and the scatter
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))
    assert ragged_rows(torch.ones(3, 10, dtype=torch.bool)) is None  # nothing to leave out: dense


def test_several_sequences_in_a_row_attend_only_within_themselves():
    """A packed row (segments 0..3, 4..8, 9 of one row; the other row whole) = block-diagonal masking."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=gen) for _ in range(3))
    segment = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 2], [3] * 10])
    ragged = Ragged(torch.arange(20), torch.tensor([0, 4, 9, 10, 20]), 10, 20)
    out = attention(q, k, v, ragged)
    ref = _masked_reference(q, k, v, segment[:, :, None] == segment[:, None, :])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_padded_caption_changes_no_media_output(tiny_cfg):
    """Two captions of 5 and 12 tokens padded into one batch give each sample the velocity and hidden
    states it gets alone with its caption unpadded (no padding at all: the dense path)."""
    model = randomize(MMDiT(model_params(tiny_cfg)), seed=2).eval()
    media, ids, txt = joint_batch(tiny_cfg)
    lengths = (5, 12)
    mask = torch.arange(txt.shape[1])[None] < torch.tensor(lengths)[:, None]
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        batch = model(media, ids, t, txt, txt_mask=mask, return_hidden=(2,))
        for i, n in enumerate(lengths):
            alone = model({m: x[i : i + 1] for m, x in media.items()}, ids, t[i : i + 1], txt[i : i + 1, :n])
            for m in media:
                torch.testing.assert_close(
                    batch.velocity[m][i : i + 1], alone.velocity[m], atol=1e-5, rtol=1e-4
                )
    assert torch.isfinite(batch.hidden[2]).all()


def test_the_default_configuration_passes_no_mask_to_sdpa(tiny_cfg, monkeypatch):
    """Padded captions and caption dropout, as in training: every SDPA call has attn_mask None (so on
    CUDA it may run FlashAttention / cuDNN)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = randomize(MMDiT(model_params(tiny_cfg)), seed=2)
    media, ids, txt = joint_batch(tiny_cfg)
    mask = torch.ones_like(txt, dtype=torch.bool)
    mask[0, 7:] = False
    out = model(media, ids, torch.rand(2), txt, txt_mask=mask, drop_txt=torch.tensor([False, True]))
    sum(v.sum() for v in out.velocity.values()).backward()
    assert len(seen) >= model.params.depth and all(m is None for m in seen)  # on the CPU: one per caption


def test_backends_are_sdpa_or_flash(tiny_cfg):
    assert check_backend("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        check_backend("xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        MMDiT(replace(model_params(tiny_cfg), attn_backend="nope"))


def test_the_jagged_kernel_of_cuda_gives_the_cpu_loops_numbers():
    """The CUDA path (SDPA over a jagged nested tensor) runs on the CPU too: same outputs as the loop."""
    from einops import rearrange

    from selfflow.models.attention import _ragged_loop, _ragged_sdpa

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen) for _ in range(3))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 3:5] = False
    ragged = ragged_rows(keep)
    flat = [rearrange(x, "b h n d -> (b n) h d").index_select(0, ragged.index) for x in (q, k, v)]
    torch.testing.assert_close(_ragged_sdpa(*flat, ragged), _ragged_loop(*flat, ragged), atol=1e-6, rtol=1e-5)
