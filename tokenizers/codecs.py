"""Codecs between media and the latents the transformer models, one interface for every modality.

`IdentityCodec` models pixels / waveforms directly (the default; exact round trip). A diffusers
autoencoder loaded from a local directory serves users who have autoencoder weights: AutoencoderKL
for images and video (frame by frame) and AutoencoderOobleck for audio. Codecs are frozen: never in
the optimizer, never in the trainable checkpoint.

Every codec exposes `in_channels` (pixel / waveform channels), `latent_channels`, `space_stride`
(pixels per latent pixel), `time_stride` (video frames, or audio samples, per latent step), `encode`
and `decode`, which map channels-first media to channels-first latents of the same layout.
When the autoencoder's config has per-channel `latents_mean` / `latents_std` (SDXL-style KL
autoencoders), latents are normalised per channel instead: (mode - mean) * scaling_factor / std.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from selfflow.tokenizers.spec import ClipSpec

SUPPORTED_AUTOENCODERS = {
    "AutoencoderKL": ("image", "video"),
    "AutoencoderKLWan": ("video",),  # causal: T frames -> 1 + (T - 1) / time_stride latent frames
    "AutoencoderOobleck": ("audio",),
}


class IdentityCodec(nn.Module):
    """Latents are the media themselves."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_channels, self.latent_channels, self.space_stride, self.time_stride = channels, channels, 1, 1
        self.causal = False

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


class DiffusersAutoencoder(nn.Module):
    """A frozen diffusers autoencoder from a local directory (`config.json` + weights), no download.

    Latents are normalised as (mode - shift_factor) * scaling_factor, the autoencoder's own
    convention, or per channel as (mode - latents_mean) * scaling_factor / latents_std when the config
    has those; decode undoes it.
    """

    def __init__(self, path: str | Path, modality: str) -> None:
        super().__init__()
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no autoencoder config at {config_file}")
        config = json.loads(config_file.read_text())
        name = config.get("_class_name")
        if modality not in SUPPORTED_AUTOENCODERS.get(name, ()):
            raise ValueError(f"{name!r} at {path} is not a supported {modality} autoencoder")
        import diffusers  # local import: diffusers takes seconds to import

        self.ae = getattr(diffusers, name).from_pretrained(str(path)).eval().requires_grad_(False)
        self.modality = modality
        scale, shift = config.get("scaling_factor"), config.get("shift_factor")
        self.scale = 1.0 if scale is None else float(scale)
        self.shift = 0.0 if shift is None else float(shift)
        self.causal = self.whole_clips = name == "AutoencoderKLWan"  # encodes clips, not frames
        if name == "AutoencoderKL":
            self.in_channels, self.latent_channels = config["in_channels"], config["latent_channels"]
            self.space_stride, self.time_stride = 2 ** (len(config["block_out_channels"]) - 1), 1
        elif name == "AutoencoderKLWan":
            self.in_channels, self.latent_channels = config.get("in_channels") or 3, config["z_dim"]
            patch = config.get("patch_size") or 1
            self.space_stride = 2 ** (len(config["dim_mult"]) - 1) * patch
            self.time_stride = 2 ** sum(bool(d) for d in config["temperal_downsample"])
        else:
            self.in_channels = config["audio_channels"]
            self.latent_channels = config["decoder_input_channels"]
            self.space_stride, self.time_stride = 1, int(torch.tensor(config["downsampling_ratios"]).prod())
        self._channel_statistics(config, path)

    def _channel_statistics(self, config: dict, path: str | Path) -> None:
        """Per-channel latents_mean / latents_std of the config, when it has both."""
        mean, std = config.get("latents_mean"), config.get("latents_std")
        self.per_channel = mean is not None and std is not None  # [C] statistics of the latent channels
        if not self.per_channel:
            return
        if not len(mean) == len(std) == self.latent_channels:
            raise ValueError(f"{path}: latents_mean / latents_std need {self.latent_channels} values each")
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        frames = x.shape[2] if self.modality == "video" and not self.whole_clips else 0
        if frames:
            x = rearrange(x, "b c t h w -> (b t) c h w")
        mode = self.ae.encode(x).latent_dist.mode()
        if self.per_channel:
            mean, std = self._stats(mode)
            z = (mode - mean) * self.scale / std
        else:
            z = (mode - self.shift) * self.scale
        return rearrange(z, "(b t) c h w -> b c t h w", t=frames) if frames else z

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """latents_mean, latents_std shaped to broadcast over z [B, C, ...] along its channel axis."""
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return self.latents_mean.to(z).view(shape), self.latents_std.to(z).view(shape)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        frames = z.shape[2] if self.modality == "video" and not self.whole_clips else 0
        if frames:
            z = rearrange(z, "b c t h w -> (b t) c h w")
        if self.per_channel:
            mean, std = self._stats(z)
            x = self.ae.decode(z * std / self.scale + mean).sample
        else:
            x = self.ae.decode(z / self.scale + self.shift).sample
        return rearrange(x, "(b t) c h w -> b c t h w", t=frames) if frames else x


Codec = IdentityCodec | DiffusersAutoencoder


def build_codec(source: str, modality: str, spec: ClipSpec) -> Codec:
    """`identity`, or a local directory holding a diffusers autoencoder; checked against the spec."""
    pixel_channels = spec.audio_channels if modality == "audio" else spec.video_channels
    codec = IdentityCodec(pixel_channels) if source == "identity" else DiffusersAutoencoder(source, modality)
    check_codec(codec, modality, spec)
    return codec


def check_codec(codec: Codec, modality: str, spec: ClipSpec) -> None:
    """The spec's codec geometry must match the codec, or token counts would silently be wrong."""
    want = {
        "image": (spec.video_channels, spec.image_latent_channels, spec.space_stride, 1),
        "video": (spec.video_channels, spec.video_latent_channels, spec.space_stride, spec.time_stride),
        "audio": (spec.audio_channels, spec.audio_latent_channels, 1, spec.audio_stride),
    }[modality]
    have = (codec.in_channels, codec.latent_channels, codec.space_stride, codec.time_stride)
    if have != want:
        what = "(channels, latent channels, space stride, time stride)"
        raise ValueError(f"{modality} codec has {what} {have}; the clip spec says {want}")
    causal = spec.causal_time and modality == "video"
    if codec.causal != causal:
        kind = "causal (its first frame alone)" if codec.causal else "not causal"
        raise ValueError(f"{modality} codec is {kind}; set spec.causal_time={str(codec.causal).lower()}")
