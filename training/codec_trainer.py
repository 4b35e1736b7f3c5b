"""Train a small autoencoder of the diffusers classes `tokenizers/codecs.py` loads, so one loading path
serves pretrained and home-trained codecs (`tools/train_codec.py` is the command line).

    recipe = CodecRecipe("audio", "oobleck", width=16, latent_channels=8, down=(4, 4, 8), steps=2000)
    report = train_codec(recipe, "shards/", "codecs/audio", spec)   # a diffusers folder + report.json

Objective: L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (mean over latent elements), plus, for
audio, stft_weight * a multi-resolution STFT loss (spectral convergence + log-magnitude L1 at three FFT
sizes). Media come from the training reader (`DataPipeline`) over every task that has the modality.

The run state (weights, AdamW, RNG, data position, step) is saved every `ckpt_every` steps in
`out/.train/state/` and a rerun continues from it, exactly. At the end the latents' per-channel mean and
standard deviation (posterior mode, `stats_batches` batches) go into the config as `latents_mean` /
`latents_std`, which the codec applies, and `out/` gets the diffusers folder and `report.json`:
PSNR for images and video, SI-SNR and onset preservation for audio, on `eval_shards`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from selfflow.data.atomic import atomic_path, fsync_dir, write_atomic
from selfflow.data.fields import TASK_MODALITIES
from selfflow.data.pipeline import DataPipeline, available_tasks
from selfflow.metrics.avsync import audio_onsets, match_offsets
from selfflow.tokenizers.spec import ClipSpec

ARCHS = {"image": ("kl",), "video": ("wan", "kl"), "audio": ("oobleck",)}
CLASSES = {"kl": "AutoencoderKL", "wan": "AutoencoderKLWan", "oobleck": "AutoencoderOobleck"}


@dataclass
class CodecRecipe:
    modality: str  # image | video | audio
    arch: str  # kl (images, video frame by frame) | wan (causal video) | oobleck (audio)
    width: int = 32  # channels of the first stage (a multiple of 8 for kl / wan)
    latent_channels: int = 4
    down: tuple[int, ...] = (2, 2, 2)  # kl / wan: one 2x stage per entry (all 2); oobleck: its strides
    time_down: int = 2  # wan: how many of the last stages also halve time (time stride 2 ** time_down)
    steps: int = 1000
    batch: int = 8
    lr: float = 3e-4
    kl_weight: float = 1e-4
    stft_weight: float = 1.0
    ckpt_every: int = 200
    stats_batches: int = 8
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # more constructor arguments of the class

    def __post_init__(self) -> None:
        if self.arch not in ARCHS.get(self.modality, ()):
            raise ValueError(
                f"--arch {self.arch} cannot code {self.modality} (one of {ARCHS.get(self.modality)})"
            )
        if self.arch != "oobleck" and (set(self.down) != {2} or self.width % 8):
            raise ValueError(
                f"{self.arch}: --down takes 2x stages (got {self.down}), --width a multiple of 8"
            )
        if self.arch == "wan" and not 0 <= self.time_down <= len(self.down):
            raise ValueError(f"wan: --time-down must be 0..{len(self.down)}")


def build_autoencoder(recipe: CodecRecipe, spec: ClipSpec) -> nn.Module:
    """A randomly initialised diffusers autoencoder of the recipe, for the spec's channels and rate."""
    import diffusers

    torch.manual_seed(recipe.seed)
    lc, w, n = recipe.latent_channels, recipe.width, len(recipe.down)
    neutral = dict(latents_mean=[0.0] * lc, latents_std=[1.0] * lc)  # replaced by measured ones at the end
    if recipe.arch == "kl":
        blocks = tuple(w * min(2**i, 4) for i in range(n + 1))
        kw = dict(in_channels=spec.video_channels, out_channels=spec.video_channels,
                  block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * (n + 1),
                  up_block_types=("UpDecoderBlock2D",) * (n + 1), layers_per_block=1, latent_channels=lc,
                  norm_num_groups=8, scaling_factor=1.0, **neutral)  # fmt: skip
    elif recipe.arch == "wan":
        time = [False] * (n - recipe.time_down) + [True] * recipe.time_down
        kw = dict(base_dim=w, z_dim=lc, dim_mult=[1] + [2] * n, num_res_blocks=1, attn_scales=[],
                  temperal_downsample=time, **neutral)  # fmt: skip
    else:
        mults = [2**i for i in range(1, n + 1)]
        kw = dict(encoder_hidden_size=w, downsampling_ratios=list(recipe.down), channel_multiples=mults,
                  decoder_channels=w, decoder_input_channels=lc, audio_channels=spec.audio_channels,
                  sampling_rate=spec.sample_rate)  # fmt: skip
    return getattr(diffusers, CLASSES[recipe.arch])(**{**kw, **recipe.extra})


def media_stream(
    shards: str, spec: ClipSpec, modality: str, batch: int, seed: int, **options: Any
) -> DataPipeline:
    """The training reader over every task that has `modality` (its media, decoded, never latents)."""
    tasks = [t for t in available_tasks(shards) if modality in TASK_MODALITIES[t]]
    if not tasks:
        raise FileNotFoundError(f"no shards with {modality} media in {shards}")
    return DataPipeline(
        shards, spec, seed=seed, weights=dict.fromkeys(tasks, 1.0), batch_size=batch, **options
    )


def stft_loss(recon: Tensor, x: Tensor, sizes: tuple[int, ...] = (256, 512, 1024)) -> Tensor:
    """Multi-resolution STFT loss of waveforms [B, C, N]: spectral convergence + log-magnitude L1."""
    total = recon.new_zeros(())
    for n in (min(s, x.shape[-1]) for s in sizes):
        window = torch.hann_window(n, device=x.device)

        def mag(y: Tensor, n: int = n, window: Tensor = window) -> Tensor:  # [B C, F, frames]
            spec = torch.stft(y.reshape(-1, y.shape[-1]), n, n // 4, window=window, return_complex=True)
            return spec.abs().clamp_min(1e-5)

        a, b = mag(recon), mag(x)
        total = total + torch.linalg.norm(b - a) / torch.linalg.norm(b) + F.l1_loss(a.log(), b.log())
    return total / len(sizes)


def codec_loss(ae: nn.Module, x: Tensor, recipe: CodecRecipe) -> tuple[Tensor, dict[str, float]]:
    """Reconstruction + KL (+ STFT for audio) of media x (channels first, [-1, 1])."""
    frames = recipe.arch == "kl" and recipe.modality == "video"
    if frames:  # a 2-D autoencoder codes video frame by frame
        x = x.transpose(1, 2).flatten(0, 1)  # [B T, C, H, W]
    posterior = ae.encode(x).latent_dist
    recon = ae.decode(posterior.sample()).sample
    rec = F.l1_loss(recon, x)
    kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()  # per latent element
    loss = rec + recipe.kl_weight * kl
    parts = {"rec": rec.item(), "kl": kl.item()}
    if recipe.modality == "audio":
        stft = stft_loss(recon, x)
        loss = loss + recipe.stft_weight * stft
        parts["stft"] = stft.item()
    return loss, parts


def _save_state(
    state_dir: Path, ae: nn.Module, opt: torch.optim.Optimizer, pipe: DataPipeline, step: int
) -> None:
    """The run state, replaced as a whole: written beside, fsynced, renamed over the old one."""
    tmp, old = state_dir.with_name("state.tmp"), state_dir.with_name("state.old")
    shutil.rmtree(tmp, ignore_errors=True)
    ae.save_pretrained(tmp / "ae")
    extra = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": step}
    with atomic_path(tmp / "train.pt", durable=True) as path:
        torch.save({**extra, "data": json.dumps(pipe.state_dict())}, path)
    for file in (tmp / "ae").iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    fsync_dir(state_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def _resume(state_dir: Path, ae: nn.Module, opt: torch.optim.Optimizer, pipe: DataPipeline) -> int:
    """Load the saved run state into ae / opt / pipe; the step it was taken at (0 without one)."""
    if not (state_dir / "train.pt").is_file():
        return 0
    saved = type(ae).from_pretrained(str(state_dir / "ae"))
    ae.load_state_dict(saved.state_dict())
    state = torch.load(state_dir / "train.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    pipe.load_state_dict(json.loads(state["data"]))
    return int(state["step"])


def train_codec(
    recipe: CodecRecipe,
    shards: str,
    out: str | Path,
    spec: ClipSpec,
    eval_shards: str | None = None,
    eval_n: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or continue) the recipe's autoencoder on `shards`; publish it in `out`; return the report."""
    out, torch_threads = Path(out), torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    ae = build_autoencoder(recipe, spec)
    if recipe.arch == "wan" and (spec.num_frames - 1) % 2**recipe.time_down:
        raise ValueError(f"wan: {spec.num_frames} frames are not 1 + a multiple of {2**recipe.time_down}")
    opt = torch.optim.AdamW(ae.parameters(), lr=recipe.lr, weight_decay=0.0)
    pipe = media_stream(shards, spec, recipe.modality, recipe.batch, recipe.seed)
    step = _resume(out / ".train" / "state", ae, opt, pipe)
    bar = tqdm(total=recipe.steps, initial=step, disable=not progress, desc=f"{recipe.modality} codec")
    ae.train()
    while step < recipe.steps:
        loss, parts = codec_loss(ae, next(pipe).media[recipe.modality], recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
        if step % recipe.ckpt_every == 0 or step == recipe.steps:
            _save_state(out / ".train" / "state", ae, opt, pipe, step)
    bar.close()
    torch.set_num_threads(torch_threads)
    ae.eval()
    _set_statistics(ae, recipe, spec, shards)
    _publish(ae, out)
    report = {
        "recipe": asdict(recipe),
        "steps": step,
        **evaluate_codec(out, recipe, spec, eval_shards or shards, eval_n),
    }
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def _set_statistics(ae: nn.Module, recipe: CodecRecipe, spec: ClipSpec, shards: str) -> None:
    """latents_mean / latents_std of the posterior mode over `stats_batches` batches, into the config."""
    pipe = media_stream(shards, spec, recipe.modality, recipe.batch, recipe.seed + 1)
    modes = []
    for _ in range(recipe.stats_batches):
        x = next(pipe).media[recipe.modality]
        if recipe.arch == "kl" and recipe.modality == "video":
            x = x.transpose(1, 2).flatten(0, 1)
        z = ae.encode(x).latent_dist.mode()  # [B, C, ...]
        modes.append(z.transpose(0, 1).reshape(z.shape[1], -1))  # [C, B ...]
    z = torch.cat(modes, dim=1)
    ae.register_to_config(latents_mean=z.mean(1).tolist(), latents_std=z.std(1).clamp_min(1e-6).tolist())


def _publish(ae: nn.Module, out: Path) -> None:
    """The diffusers folder: weights, then config.json, each renamed into `out` complete."""
    staging = out / ".train" / "final"
    shutil.rmtree(staging, ignore_errors=True)
    ae.save_pretrained(staging)
    config = json.loads((staging / "config.json").read_text())
    if "latents_mean" not in config:  # Oobleck's constructor has no statistics: the codec reads them here
        config |= {"latents_mean": list(ae.config.latents_mean), "latents_std": list(ae.config.latents_std)}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in sorted(p.name for p in staging.iterdir() if p.name != "config.json") + ["config.json"]:
        with open(staging / name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging / name, out / name)
    fsync_dir(out)


def psnr(recon: Tensor, x: Tensor) -> Tensor:
    """Per-sample PSNR (dB) of media in [-1, 1] (peak-to-peak 2)."""
    mse = ((recon.clamp(-1, 1) - x) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def si_snr(est: Tensor, ref: Tensor) -> Tensor:
    """Per-sample scale-invariant SNR (dB) of waveforms [B, C, N]."""
    est, ref = est.flatten(1), ref.flatten(1)
    est, ref = est - est.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
    target = (est * ref).sum(1, keepdim=True) / (ref**2).sum(1, keepdim=True).clamp_min(1e-10) * ref
    return 10 * torch.log10(
        (target**2).sum(1).clamp_min(1e-10) / ((est - target) ** 2).sum(1).clamp_min(1e-10)
    )


def onset_preservation(recon: Tensor, x: Tensor, sample_rate: int, tolerance_s: float) -> tuple[int, int]:
    """(original onsets with a reconstructed onset within `tolerance_s`, original onsets) over a batch."""
    kept = total = 0
    for a, b in zip(recon.numpy(), x.numpy(), strict=True):
        original = audio_onsets(b, sample_rate)
        offsets = match_offsets(original, audio_onsets(a, sample_rate))
        kept += sum(abs(o) <= tolerance_s for o in offsets)
        total += len(original)
    return kept, total


@torch.no_grad()
def evaluate_codec(folder: Path, recipe: CodecRecipe, spec: ClipSpec, shards: str, n: int) -> dict[str, Any]:
    """Reconstruction quality of the published codec (loaded as training loads it) on `n` samples."""
    from selfflow.tokenizers.codecs import DiffusersAutoencoder

    codec = DiffusersAutoencoder(folder, recipe.modality)  # the spec describes pixels here, not latents
    pipe = media_stream(shards, spec, recipe.modality, min(n, recipe.batch), seed=12345, shuffle_buffer=0,
                        clip_window="start")  # fmt: skip
    scores: dict[str, list[float]] = {}
    kept = onsets = seen = 0
    while seen < n:
        x = next(pipe).media[recipe.modality][: n - seen]
        recon = codec.decode(codec.encode(x))
        seen += len(x)
        if recipe.modality == "audio":
            scores.setdefault("si_snr_db", []).extend(si_snr(recon, x).tolist())
            k, t = onset_preservation(recon, x, spec.sample_rate, tolerance_s=1.0 / spec.fps)
            kept, onsets = kept + k, onsets + t
        else:
            scores.setdefault("psnr_db", []).extend(psnr(recon, x).tolist())
    report: dict[str, Any] = {"eval_samples": seen, "eval_shards": shards}
    report |= {k: round(float(np.mean(v)), 3) for k, v in scores.items()}
    if recipe.modality == "audio":
        report |= {"onsets": onsets, "onsets_preserved": round(kept / onsets, 3) if onsets else math.nan}
    shape = list(_latent_shape(codec, spec, recipe))
    report["latents"] = {"channels": codec.latent_channels, "space_stride": codec.space_stride,
                         "time_stride": codec.time_stride, "shape": shape}  # fmt: skip
    return report


def _latent_shape(codec: nn.Module, spec: ClipSpec, recipe: CodecRecipe) -> tuple[int, ...]:
    s, t = codec.space_stride, codec.time_stride
    if recipe.modality == "image":
        return codec.latent_channels, spec.image_height // s, spec.image_width // s
    if recipe.modality == "video":
        frames = 1 + (spec.num_frames - 1) // t if codec.causal else spec.num_frames // t
        return codec.latent_channels, frames, spec.height // s, spec.width // s
    return codec.latent_channels, spec.num_samples // t
