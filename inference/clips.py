"""Writing a sampled clip: an mp4 (H.264 + AAC) with its wav, a PNG contact sheet of the frames and a
JSON sidecar, each written atomically, the mp4 last; and the clip spec a sampling command asks for."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import soundfile
import torch

from selfflow.configs.schema import Config
from selfflow.data.atomic import write_atomic
from selfflow.data.avio import encode_mp4
from selfflow.data.decode import parse_size
from selfflow.inference.pipeline import image_grid, to_uint8


def clip_spec(cfg: Config, args: argparse.Namespace) -> Config:
    """The model's config with the requested duration / fps / size (checked by ClipSpec)."""
    change = {}
    if args.duration is not None:
        change["duration"] = args.duration
    if args.fps is not None:
        change["fps"] = args.fps
    if args.size is not None:
        change["height"], change["width"] = parse_size(args.size)
    try:
        return dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, **change))
    except (TypeError, ValueError) as e:
        raise ValueError(f"clip spec: {e}") from None


def write_clip(out: Path, video: torch.Tensor, audio: torch.Tensor | None, cfg: Config, meta: dict) -> None:
    """video [C, T, H, W] (and audio [C, N]) in [-1, 1] -> out.mp4 (+ out.wav), out.png, out.json."""
    spec = cfg.spec
    frames = to_uint8(video.permute(1, 0, 2, 3))  # [T, H, W, C]
    wave = None if audio is None else audio.clamp(-1, 1).numpy().astype(np.float32)  # [C, N]
    mp4 = encode_mp4(frames, spec.fps, wave, spec.sample_rate, metadata={"comment": json.dumps(meta)})
    sheet = io.BytesIO()
    image_grid(video.permute(1, 0, 2, 3), nrow=min(8, spec.num_frames)).save(sheet, format="PNG")
    files = {".png": sheet.getvalue(), ".json": json.dumps(meta, indent=2).encode()}
    if wave is not None:
        buf = io.BytesIO()
        soundfile.write(buf, wave.T, spec.sample_rate, format="WAV")
        files[".wav"] = buf.getvalue()
    for suffix, data in files.items():
        write_atomic(out.with_suffix(suffix), data)
    write_atomic(out, mp4)  # last: its presence means the set is complete
