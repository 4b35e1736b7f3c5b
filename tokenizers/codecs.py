"""Codecs between media and the latents the transformer models, one interface for every modality.

`IdentityCodec` models pixels / waveforms directly (the default; exact round trip). A diffusers
autoencoder in a local folder (never downloaded) serves users who have autoencoder weights:

| class | modality | latents |
|---|---|---|
| AutoencoderKL | image, video (frame-wise) | (mode - shift) * scale; per channel with latents_mean / std |
| AutoencoderKLFlux2 | image | 2x2-patchified mode, normalised by the autoencoder's batch-norm statistics |
| AutoencoderKLWan | video (causal, whole clips) | 1 + (T - 1) / time_stride latent frames; per channel |
| AutoencoderOobleck | audio | the posterior mode (Stable Audio) |
| LongCatAudioDiTVae | audio | the posterior mean / the config's `scale` (LongCat-AudioDiT) |

Codecs are frozen: never in the optimizer, never in the trainable checkpoint. The geometry comes from
`config.json` alone and the weights load on the first encode / decode, so a run that reads stored
latents (`data/latents.py`) needs only the config until it decodes a sample grid. `codec_stamp` names a
folder's codec (class, config and weights hashes) for those stored latents.

Every codec exposes `in_channels` (pixel / waveform channels), `latent_channels`, `space_stride`
(pixels per latent pixel), `time_stride` (video frames, or audio samples, per latent step), `causal`,
`encode` and `decode`, which map channels-first media to channels-first latents of the same layout.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from selfflow.tokenizers.spec import ClipSpec

SUPPORTED_AUTOENCODERS = {
    "AutoencoderKL": ("image", "video"),
    "AutoencoderKLFlux2": ("image",),  # FLUX.2: 8x, then 2x2 patches: 16x space, 4 x latent_channels
    "AutoencoderKLWan": ("video",),  # causal: T frames -> 1 + (T - 1) / time_stride latent frames
    "AutoencoderOobleck": ("audio",),
    "LongCatAudioDiTVae": ("audio",),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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


def read_config(path: str | Path) -> dict[str, Any]:
    """A diffusers autoencoder folder's config.json, the class's defaults filled in for missing keys."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no autoencoder config at {config_file}")
    config = json.loads(config_file.read_text())
    name = config.get("_class_name")
    if name not in SUPPORTED_AUTOENCODERS:
        raise ValueError(f"{name!r} at {path} is not one of {', '.join(SUPPORTED_AUTOENCODERS)}")
    import diffusers  # local import: diffusers takes seconds to import

    signature = inspect.signature(getattr(diffusers, name).__init__).parameters.values()
    defaults = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def _geometry(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(in_channels, latent_channels, space_stride, time_stride) from a filled-in config."""
    name = config["_class_name"]
    if name == "AutoencoderKL":
        return (
            config["in_channels"],
            config["latent_channels"],
            2 ** (len(config["block_out_channels"]) - 1),
            1,
        )
    if name == "AutoencoderKLFlux2":
        ph, pw = config["patch_size"]
        if ph != pw:
            raise ValueError(f"AutoencoderKLFlux2 patch_size {config['patch_size']} is not square")
        stride = 2 ** (len(config["block_out_channels"]) - 1) * ph
        return config["in_channels"], config["latent_channels"] * ph * pw, stride, 1
    if name == "AutoencoderKLWan":
        space = 2 ** (len(config["dim_mult"]) - 1) * (config.get("patch_size") or 1)
        time = 2 ** sum(bool(d) for d in config["temperal_downsample"])
        return config.get("in_channels") or 3, config["z_dim"], space, time
    if name == "AutoencoderOobleck":
        ratio = math.prod(config["downsampling_ratios"])
        return config["audio_channels"], config["decoder_input_channels"], 1, ratio
    # LongCatAudioDiTVae: stages from c_mults, strides padded / cut to them as its encoder does
    stages = len(config["c_mults"] or [1, 2, 4, 8, 16])
    strides = list(config["strides"] or [2] * stages)
    strides = (strides + [strides[-1] if strides else 2] * stages)[:stages]
    return config["in_channels"], config["latent_dim"], 1, math.prod(strides)


class DiffusersAutoencoder(nn.Module):
    """A frozen diffusers autoencoder from a local folder (`config.json`, weights loaded on first use).

    Latents are normalised as (mode - shift_factor) * scaling_factor, the autoencoder's own
    convention, or per channel as (mode - latents_mean) * scaling_factor / latents_std when the config
    has those (FLUX.2: the batch-norm running statistics of its patchified latents); decode undoes it.
    """

    def __init__(self, path: str | Path, modality: str) -> None:
        super().__init__()
        config = read_config(path)
        name = config["_class_name"]
        if modality not in SUPPORTED_AUTOENCODERS[name]:
            raise ValueError(f"{name!r} at {path} is not a supported {modality} autoencoder")
        self.path, self.name, self.modality = Path(path), name, modality
        self.in_channels, self.latent_channels, self.space_stride, self.time_stride = _geometry(config)
        self.causal = name == "AutoencoderKLWan"  # encodes whole clips, the first frame alone
        self.frame_wise = modality == "video" and name == "AutoencoderKL"
        self.patch = config["patch_size"][0] if name == "AutoencoderKLFlux2" else 1
        scale, shift = config.get("scaling_factor"), config.get("shift_factor")
        self.scale = 1.0 if scale is None else float(scale)
        self.shift = 0.0 if shift is None else float(shift)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # the device .to() chose
        self.per_channel = name == "AutoencoderKLFlux2"  # its statistics come with the weights
        self._channel_statistics(config, path)

    def _channel_statistics(self, config: dict, path: str | Path) -> None:
        """Per-channel latents_mean / latents_std of the config, when it has both."""
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None or std is None:
            return
        if not len(mean) == len(std) == self.latent_channels:
            raise ValueError(f"{path}: latents_mean / latents_std need {self.latent_channels} values each")
        self.per_channel = True
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32), persistent=False)

    @property
    def has_weights(self) -> bool:
        """Whether the folder holds weights (a folder with only config.json serves stored latents)."""
        return "ae" in self._modules or any(p.suffix in WEIGHT_SUFFIXES for p in self.path.glob("*"))

    @property
    def autoencoder(self) -> nn.Module:
        """The diffusers model, loaded from the folder on first use (FileNotFoundError without weights)."""
        if "ae" not in self._modules:
            if not self.has_weights:
                raise FileNotFoundError(
                    f"{self.path} has a config.json but no weights: encoding or decoding "
                    f"{self.modality} needs them"
                )
            import warnings

            import diffusers

            level = diffusers.utils.logging.get_verbosity()
            # Oobleck / LongCat still build on the deprecated weight_norm; classes without per-channel
            # statistics in their constructor log the latents_mean / latents_std this codec reads itself
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
                diffusers.utils.logging.set_verbosity_error()
                try:
                    ae = getattr(diffusers, self.name).from_pretrained(str(self.path))
                finally:
                    diffusers.utils.logging.set_verbosity(level)
            ae = ae.eval().requires_grad_(False).float()  # weights stored in half precision load as fp32
            self.add_module("ae", ae.to(self.anchor.device))
            if self.name == "AutoencoderKLFlux2":  # FLUX.2 normalises by its batch norm's running stats
                bn = self.ae.bn
                self.register_buffer(
                    "latents_mean", bn.running_mean.detach().float().clone(), persistent=False
                )
                std = torch.sqrt(bn.running_var.detach().float() + bn.eps)
                self.register_buffer("latents_std", std, persistent=False)
        return self._modules["ae"]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        ae = self.autoencoder
        frames = x.shape[2] if self.frame_wise else 0
        if frames:
            x = rearrange(x, "b c t h w -> (b t) c h w")
        if self.name == "LongCatAudioDiTVae":
            mode = ae.encode(x, sample_posterior=False).latents  # already divided by its `scale`
        else:
            mode = ae.encode(x).latent_dist.mode()
        if self.patch > 1:  # FLUX.2: 2x2 latent patches become channels, (c p q) as its pipeline orders them
            mode = rearrange(mode, "b c (h p) (w q) -> b (c p q) h w", p=self.patch, q=self.patch)
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
        ae = self.autoencoder
        frames = z.shape[2] if self.frame_wise else 0
        if frames:
            z = rearrange(z, "b c t h w -> (b t) c h w")
        if self.per_channel:
            mean, std = self._stats(z)
            mode = z * std / self.scale + mean
        else:
            mode = z / self.scale + self.shift
        if self.patch > 1:
            mode = rearrange(mode, "b (c p q) h w -> b c (h p) (w q)", p=self.patch, q=self.patch)
        x = ae.decode(mode).sample
        return rearrange(x, "(b t) c h w -> b c t h w", t=frames) if frames else x


Codec = IdentityCodec | DiffusersAutoencoder


def codec_stamp(path: str | Path) -> dict[str, str | None]:
    """What identifies a folder's codec: its class, a hash of config.json (keys not starting with "_":
    no diffusers version or origin) and a hash of the weight files at its top level (None without any)."""
    folder = Path(path)
    config = read_config(folder)
    own = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    weights = None
    if files:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(folder)).encode() + b"\0")
            with file.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
        weights = digest.hexdigest()[:16]
    text = json.dumps(own, sort_keys=True).encode()
    return {
        "class": config["_class_name"],
        "config": hashlib.sha256(text).hexdigest()[:16],
        "weights": weights,
    }


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
