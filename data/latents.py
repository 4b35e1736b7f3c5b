"""Precomputed codec latents for make_shards `--latents DIR`: a sample's stored media, decoded exactly as
the training pipeline decodes them, encoded by a frozen diffusers autoencoder.

    options = LatentOptions(("ae/kl", "ae/oobleck"), spec)  # AutoencoderKL: image + video; Oobleck: audio
    latent_fields("av", {"mp4": data}, options)  # {"video_latent.npy": ..., "audio_latent.npy": ...}

Fields (float32 `.npy`, no batch axis): image `latent.npy` [C, h, w], video `video_latent.npy`
[C, T, h, w], audio `audio_latent.npy` [C, n]; an av sample gets both of its modalities. The codec is
checked against the clip spec (latent channels, strides), so the spec must describe the codec.

Torch runs single-threaded here: the float sums are then the same in every process, and the shard
bytes do not depend on `--workers`. Torch and diffusers are imported only when latents are asked for.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfflow.data.avio import decode_audio, decode_av
from selfflow.data.decode import IMAGE_FIELDS, open_image, resize_center_crop, to_channels
from selfflow.data.fields import TASK_MODALITIES, VIDEO_CONTAINERS
from selfflow.tokenizers.codecs import SUPPORTED_AUTOENCODERS
from selfflow.tokenizers.spec import ClipSpec

LATENT_FIELDS = {"image": "latent.npy", "video": "video_latent.npy", "audio": "audio_latent.npy"}
_CODECS: dict = {}  # per process: (folder, modality, spec) -> codec, loaded once


@dataclass(frozen=True)
class LatentOptions:
    folders: tuple[str, ...]  # diffusers autoencoder folders (config.json + weights)
    spec: ClipSpec

    def sources(self) -> dict[str, str]:
        """modality -> autoencoder folder, from the class named in each folder's config.json."""
        found: dict[str, str] = {}
        for folder in self.folders:
            config = Path(folder) / "config.json"
            if not config.is_file():
                raise ValueError(f"--latents {folder}: no config.json (not a diffusers autoencoder folder)")
            name = json.loads(config.read_text()).get("_class_name")
            if name not in SUPPORTED_AUTOENCODERS:
                raise ValueError(
                    f"--latents {folder}: {name!r} is not one of {', '.join(SUPPORTED_AUTOENCODERS)}"
                )
            for modality in SUPPORTED_AUTOENCODERS[name]:
                if modality in found:
                    raise ValueError(
                        f"--latents: two autoencoders for {modality} ({found[modality]}, {folder})"
                    )
                found[modality] = folder
        return found

    def stamp(self) -> list:
        """What identifies the codecs for resuming: every file's name, size and modification time."""
        files = sorted(p for folder in self.folders for p in Path(folder).rglob("*") if p.is_file())
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _codec(folder: str, modality: str, spec: ClipSpec):  # noqa: ANN202 (a torch module; torch loads lazily)
    key = (folder, modality, spec)
    if key not in _CODECS:
        import torch

        from selfflow.tokenizers.codecs import build_codec

        torch.set_num_threads(1)  # see the module docstring
        with warnings.catch_warnings():  # diffusers' Oobleck still builds on the deprecated weight_norm
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            _CODECS[key] = build_codec(folder, modality, spec)
    return _CODECS[key]


def check_latents(options: LatentOptions) -> None:
    """Load every codec once and check it against the spec (ValueError / OSError if it does not fit)."""
    for modality, folder in options.sources().items():
        _codec(folder, modality, options.spec)


def _pixels(modality: str, task: str, fields: dict, spec: ClipSpec) -> np.ndarray:
    """The media as the training pipeline sees them: float32 in [-1, 1], channels first."""
    if modality == "image":
        data = next(fields[f] for f in IMAGE_FIELDS if f in fields)
        img = resize_center_crop(
            to_channels(open_image(data), spec.video_channels), spec.image_height, spec.image_width
        )
        pixels = np.asarray(img, np.float32).reshape(spec.image_height, spec.image_width, -1)
        return pixels.transpose(2, 0, 1) / 127.5 - 1
    if task == "audio":
        return decode_audio(fields["flac"], spec)
    name = next(f for f in ("mp4", "webm", "mkv") if f in fields)  # the field make_shards kept the video in
    box = VIDEO_CONTAINERS[name]
    if modality == "video":
        video = decode_av(fields[name], spec, audio=False, container=box).video
        return video.astype(np.float32).transpose(3, 0, 1, 2) / 127.5 - 1  # [C, T, H, W]
    return decode_av(fields[name], spec, video=False, container=box).audio


def latent_fields(task: str, fields: dict, options: LatentOptions) -> dict[str, bytes]:
    """`.npy` latents of the sample's modalities that have a codec."""
    import torch

    out = {}
    for modality, folder in options.sources().items():
        if modality not in TASK_MODALITIES[task]:
            continue
        x = torch.from_numpy(np.ascontiguousarray(_pixels(modality, task, fields, options.spec)))[None]
        z = _codec(folder, modality, options.spec).encode(x)[0].numpy().astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, z, allow_pickle=False)
        out[LATENT_FIELDS[modality]] = buf.getvalue()
    return out
