#!/usr/bin/env python
"""The smallest end-to-end path: a synthetic captioned video+audio clip -> tokens -> Self-Flow-style
dual-level noising -> joint transformer -> velocities -> back to video and audio.

    python tools/smoke_forward.py --config configs/tiny.yaml [key=value ...]

A square moves across the frames while a tone sounds; the script checks that the video frame and
the audio that overlaps it carry the same time id and that every shape comes back. It trains
nothing: the network is freshly initialised (its zero-initialised output layer predicts v = 0).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from selfflow.configs import ConfigError, load_config
from selfflow.configs.factory import build_model
from selfflow.models import flow
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tokenizers.spec import ClipSpec
from selfflow.tokenizers.text import build_text_tokenizer


def synthetic_clip(spec: ClipSpec) -> dict[str, torch.Tensor]:
    """A white square moving left to right over [-1, 1] video, and a 440 Hz tone."""
    frames, h, w = spec.num_frames, spec.height, spec.width
    video = -torch.ones(1, spec.video_channels, frames, h, w)
    size = max(2, h // 4)
    for f in range(frames):
        x = round(f / max(1, frames - 1) * (w - size))
        video[:, :, f, h // 2 - size // 2 : h // 2 + size // 2, x : x + size] = 1.0
    n = torch.arange(spec.num_samples) / spec.sample_rate
    audio = (0.5 * torch.sin(2 * math.pi * 440.0 * n)).expand(1, spec.audio_channels, -1).clone()
    return {"video": video, "audio": audio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    model, media_tok = build_model(cfg).eval(), MediaTokenizer(cfg.spec)
    txt_ids, txt_mask = build_text_tokenizer(cfg.text.tokenizer, cfg.text.path or None).encode(
        ["a white square slides right while a tone plays"], cfg.text.max_len
    )
    clip = synthetic_clip(cfg.spec)
    x0, ids = media_tok.encode(clip)
    n_video, n_tokens = x0["video"].shape[1], ids.shape[0]

    # Two noise levels, a random quarter of the tokens at the second one (Self-Flow §3.3).
    levels = torch.tensor([[0.7, 0.2]])  # [B, K]
    index = (torch.rand(1, n_tokens) < 0.25).long()  # [B, L]
    noise = {m: torch.randn_like(x) for m, x in x0.items()}
    tau = levels.gather(1, index)  # [B, L] per-token level
    offsets = {"video": 0, "audio": n_video}
    x_t = {
        m: flow.interpolate(x, noise[m], tau[:, offsets[m] : offsets[m] + x.shape[1]]) for m, x in x0.items()
    }

    depth = model.params.depth
    with torch.no_grad():
        out = model(
            x_t,
            ids,
            levels,
            txt_ids,
            t_index=index,
            txt_t=levels[:, 0],
            txt_mask=txt_mask,
            return_hidden=(1, depth),
        )
    decoded = media_tok.decode(out.velocity)

    print(f"config {cfg.name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print(
        f"text tokens {tuple(txt_ids.shape)}, media tokens "
        + ", ".join(f"{m} {tuple(x.shape)}" for m, x in x0.items())
    )
    print(
        f"time ids (10 ms ticks): video rows {ids[:n_video, 0].unique().tolist()[:4]}..., "
        f"audio {ids[n_video:, 0].tolist()[:4]}..."
    )
    for m, v in decoded.items():
        print(f"velocity -> {m} {tuple(v.shape)} (input {tuple(clip[m].shape)})")
    print("hidden states: " + ", ".join(f"block {i} {tuple(h.shape)}" for i, h in out.hidden.items()))
    print(f"done in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
