"""Sequence packing: several samples, of any modalities, in one row of a batch.

A packed row holds each sample's caption (its `text.max_len` slots, padding left out of attention as
in an unpacked batch) and its media tokens; `media` stays a dict by modality, each modality's tokens
of all samples in sample order. `Packed` says which sample every token belongs to, so that attention
stays within a sample (models/attention.py), and which level each caption is modulated with; the
media tokens' levels come from `t` [B, K] with `t_index` [B, L] as for any per-token levels.

    media, ids, txt, mask, packed, t, t_index, drop = pack_samples(samples)      # B = 1 row
    out = model(media, ids, t, txt, t_index=t_index, txt_mask=mask, drop_txt=drop, packed=packed)
    per_sample = unpack_media(out.velocity, samples)                     # [{modality: [1, L_m, C]}]

A sample computes exactly what it computes alone in an unpacked batch (tested): same positions (each
caption counts from 0, media ids as the tokenizer gives them), same levels, same attention set.
Training packs with `pack_tokens` (training/loop.py `make_batch`, from data.pack's batches).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packed:
    txt_segment: Tensor  # [B, Lt] long: the sample (within its row) of each text slot; -1 = no sample
    media_segment: Tensor  # [B, L] long: the sample of each media token (modality-major, as `media`)
    txt_ids: Tensor  # [B, Lt, 4] text positions: each caption counts from 0 along the l axis
    levels_per_sample: int = 1  # K: sample i's levels are t[:, K i : K (i + 1)], its base level first

    @property
    def txt_level(self) -> Tensor:
        """[B, Lt] the level in t each text slot is modulated with: its sample's base level."""
        return self.txt_segment.clamp(min=0) * self.levels_per_sample


@dataclass
class Sample:
    """One sample as the model takes it unpacked (batch 1): media {modality: [1, L_m, C]}, media ids
    [L, 4], caption ids [1, Lt] with mask [1, Lt], levels t [1, K] (the caption's level first) with
    t_index [1, L], drop [1]."""

    media: dict[str, Tensor]
    ids: Tensor
    txt: Tensor
    mask: Tensor
    t: Tensor
    t_index: Tensor
    drop: Tensor


def pack_tokens(
    tokens: dict[str, Tensor],
    ids: dict[str, Tensor],
    modalities: list[tuple[str, ...]],
    txt: Tensor,
    mask: Tensor,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Packed]:
    """Samples stacked per modality (tokens[m] [n_m, L_m, C_m] in sample order; ids[m] [L_m, 4]; sample
    i has `modalities[i]`) and their captions txt [n, Lt] (or [n, Lt, F]) with mask [n, Lt] -> one
    packed row: (media {m: [1, n_m L_m, C_m]}, media ids [1, L, 4], txt [1, n Lt], mask [1, n Lt],
    Packed with one level per sample)."""
    n, lt, device = txt.shape[0], txt.shape[1], txt.device
    owners = {m: [i for i, mods in enumerate(modalities) if m in mods] for m in tokens}
    media = {m: x.reshape(1, -1, x.shape[-1]) for m, x in tokens.items()}
    media_segment = torch.cat(
        [torch.tensor(owners[m], device=device).repeat_interleave(x.shape[1]) for m, x in tokens.items()]
    )
    flat_ids = torch.cat([ids[m].to(device).repeat(len(owners[m]), 1) for m in tokens])
    txt_ids = torch.zeros(n * lt, 4, dtype=flat_ids.dtype, device=device)
    txt_ids[:, 3] = torch.arange(lt, device=device).repeat(n)  # each caption counts from 0 along l
    txt_segment = torch.arange(n, device=device).repeat_interleave(lt)
    packed = Packed(txt_segment[None], media_segment[None], txt_ids[None])
    return media, flat_ids[None], txt.reshape(1, n * lt, *txt.shape[2:]), mask.reshape(1, n * lt), packed


def pack_samples(
    samples: list[Sample],
) -> tuple[dict, Tensor, Tensor, Tensor, Packed, Tensor, Tensor, Tensor]:
    """One packed row from `samples` (batch 1 each): pack_tokens' (media, ids, txt, mask, Packed with
    their K levels each), then t [1, n K], t_index [1, L] and drop [1, n Lt] per caption slot."""
    k = samples[0].t.shape[1]
    if any(s.t.shape[1] != k for s in samples):
        raise ValueError("every sample of a packed row needs the same number of levels")
    spans = [_spans(s) for s in samples]
    order = list(dict.fromkeys(m for s in samples for m in s.media))
    tokens = {m: torch.cat([s.media[m] for s in samples if m in s.media]) for m in order}
    ids = {
        m: next(s.ids[slice(*sp[m])] for s, sp in zip(samples, spans, strict=True) if m in sp) for m in order
    }
    modalities = [tuple(s.media) for s in samples]
    txt, mask = torch.cat([s.txt for s in samples]), torch.cat([s.mask for s in samples])
    media, flat_ids, row_txt, row_mask, packed = pack_tokens(tokens, ids, modalities, txt, mask)
    t_index = torch.cat(
        [
            s.t_index[:, slice(*sp[m])] + k * i
            for m in order
            for i, (s, sp) in enumerate(zip(samples, spans, strict=True))
            if m in sp
        ],
        dim=1,
    )
    drop = torch.cat([s.drop.view(1, 1).expand(1, s.txt.shape[1]) for s in samples], dim=1)
    t = torch.cat([s.t for s in samples], dim=1)
    return media, flat_ids, row_txt, row_mask, replace(packed, levels_per_sample=k), t, t_index, drop


def _spans(sample: Sample) -> dict[str, tuple[int, int]]:
    """Where each modality's tokens sit in the sample's own [L] order."""
    spans, start = {}, 0
    for m, x in sample.media.items():
        spans[m] = (start, start + x.shape[1])
        start += x.shape[1]
    return spans


def unpack_media(out: dict[str, Tensor], samples: list[Sample]) -> list[dict[str, Tensor]]:
    """A packed row's per-modality output {modality: [1, L_m, C]} -> each sample's {modality: [1, n, C]}."""
    starts = {m: 0 for m in out}
    result = []
    for s in samples:
        mine = {}
        for m, x in s.media.items():
            mine[m] = out[m][:, starts[m] : starts[m] + x.shape[1]]
            starts[m] += x.shape[1]
        result.append(mine)
    return result
