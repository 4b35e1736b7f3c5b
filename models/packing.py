"""Sequence packing: several samples, of any modalities, in one row of a batch.

A packed row holds each sample's caption (its `text.max_len` slots, padding left out of attention as
in an unpacked batch) and its media tokens; `media` stays a dict by modality, each modality's tokens
of all samples in sample order. `Packed` says which sample every token belongs to, so that attention
stays within a sample (models/attention.py), and which level each caption is modulated with; the
media tokens' levels come from `t` [B, K] with `t_index` [B, L] as for any per-token levels.

    media, ids, txt, mask, packed, t, t_index = pack_samples(samples)     # B = 1 row
    out = model(media, ids, t, txt, t_index=t_index, txt_mask=mask, packed=packed)
    per_sample = unpack_media(out.velocity, samples)                     # [{modality: [1, L_m, C]}]

A sample computes exactly what it computes alone in an unpacked batch (tested): same positions (each
caption counts from 0, media ids as the tokenizer gives them), same levels, same attention set.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _media_order(samples: list[Sample]) -> list[str]:
    order: list[str] = []
    for s in samples:
        order += [m for m in s.media if m not in order]
    return order


def pack_samples(
    samples: list[Sample],
) -> tuple[dict, Tensor, Tensor, Tensor, Packed, Tensor, Tensor, Tensor]:
    """One packed row from `samples`: (media, media ids [1, L, 4], txt [1, Lt], mask [1, Lt], Packed,
    t [1, K], t_index [1, L], drop [1, Lt] per text slot)."""
    order, k_offset = _media_order(samples), 0
    media: dict[str, list[Tensor]] = {m: [] for m in order}
    ids, segment, t_index = {m: [] for m in order}, {m: [] for m in order}, {m: [] for m in order}
    txt_segment, txt_ids, drop = [], [], []
    if len({s.t.shape[1] for s in samples}) != 1:
        raise ValueError("every sample of a packed row needs the same number of levels")
    for i, s in enumerate(samples):
        start = 0
        for m, x in s.media.items():  # the sample's own modality order gives its slice of ids / t_index
            n = x.shape[1]
            media[m].append(x)
            ids[m].append(s.ids[start : start + n])
            t_index[m].append(s.t_index[:, start : start + n] + k_offset)
            segment[m].append(torch.full((1, n), i, dtype=torch.long))
            start += n
        lt = s.txt.shape[1]
        txt_segment.append(torch.full((1, lt), i, dtype=torch.long))
        position = torch.zeros(1, lt, 4, dtype=s.ids.dtype)
        position[..., 3] = torch.arange(lt, dtype=s.ids.dtype)
        txt_ids.append(position)
        drop.append(s.drop.view(1, 1).expand(1, lt))
        k_offset += s.t.shape[1]
    cat = lambda parts, dim=1: torch.cat(parts, dim=dim)  # noqa: E731
    media_segment = cat([cat(segment[m]) for m in order])
    packed = Packed(cat(txt_segment), media_segment, cat(txt_ids), samples[0].t.shape[1])
    flat_ids = cat([cat(ids[m], 0) for m in order], 0)[None]  # [1, L, 4]
    return (
        {m: cat(media[m]) for m in order},
        flat_ids,
        cat([s.txt for s in samples]),
        cat([s.mask for s in samples]),
        packed,
        cat([s.t for s in samples]),
        cat([cat(t_index[m]) for m in order]),
        cat(drop),
    )


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
