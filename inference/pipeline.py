"""The generation pipeline shared by the sampling CLIs and the training loop's sample grids:
load a snapshot (EMA weights + resolved config), encode prompts once, integrate the velocity field
from noise (t = 1) to data (t = 0) with a sampler from `samplers.py`, decode tokens to media.

    cfg, model = load_snapshot("runs/demo")       # a run dir, its checkpoints/ or one checkpoint
    gen = Generator(cfg, model, device="cpu")
    images = gen.generate(["a photo of a bag"], seeds=[0], modalities=("image",))["image"]
    save_image_grid(images, "bag.png")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from selfflow.configs.factory import (
    TextConditioner,
    build_media_tokenizer,
    build_model,
    build_text_conditioner,
)
from selfflow.configs.schema import Config, load_config
from selfflow.data.atomic import atomic_path
from selfflow.inference import samplers
from selfflow.inference.snapshot import DEFAULT_SNAPSHOT, check_snapshot, is_snapshot, snapshot_weights
from selfflow.inference.weights import resolve_checkpoint
from selfflow.models.mmdit import MMDiT
from selfflow.tokenizers.media import MediaTokenizer


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when present, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (precision auto | bf16), nothing on CPU unless precision == bf16."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_model(path: str | Path | None) -> Path:
    """--model -> a model folder (snapshot) or a complete checkpoint; None -> the default model that ships."""
    if path is None:
        if not is_snapshot(DEFAULT_SNAPSHOT):
            raise FileNotFoundError(f"no default model at {DEFAULT_SNAPSHOT}: pass --model")
        return DEFAULT_SNAPSHOT
    return Path(path) if is_snapshot(path) else resolve_checkpoint(path)


def weights_file(path: Path, weights: str = "ema") -> Path:
    """The safetensors file a snapshot or checkpoint (from `resolve_model`) is sampled with."""
    return snapshot_weights(path) if is_snapshot(path) else path / f"{weights}.safetensors"


def load_snapshot(
    path: str | Path | None,
    device: str | torch.device = "cpu",
    weights: str = "ema",
    max_memory: dict[int | str, str] | None = None,
    offload_dir: str | Path | None = None,
) -> tuple[Config, MMDiT]:
    """The resolved config and the model, in eval mode, from a snapshot folder (sha256-checked), or a
    run / checkpoint with its `weights` ("ema" or "model"); None: the default model. With `max_memory`
    the weights are spread over devices (and `offload_dir`) by accelerate instead (`offload.py`)."""
    ckpt = resolve_model(path)
    cfg = check_snapshot(ckpt)[0] if is_snapshot(ckpt) else load_config(ckpt / "config.yaml")
    file = weights_file(ckpt, weights)
    if not file.is_file():
        raise FileNotFoundError(f"{ckpt} has no {file.relative_to(ckpt)}")
    try:
        if max_memory is not None:
            from selfflow.inference.offload import load_dispatched  # accelerate: only when asked for

            return cfg, load_dispatched(cfg, file, max_memory, offload_dir)
        state = {k: v.float() for k, v in load_file(str(file), device="cpu").items()}
        model = build_model(cfg, "meta")
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(
            f"{ckpt}: the weights do not fit the saved config ({str(e).splitlines()[0]})"
        ) from None
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise ValueError(f"{ckpt}: unreadable weights ({e})") from None
    return cfg, model.to(device).eval()


class Generator:
    """Text-conditioned generation for one model: prompts -> {modality: media} on the CPU."""

    def __init__(
        self,
        cfg: Config,
        model: MMDiT,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        media: MediaTokenizer | None = None,
        encode_text: TextConditioner | None = None,
    ) -> None:
        """`media` / `encode_text` default to new ones from `cfg`; the trainer passes its own."""
        self.cfg, self.model = cfg, model
        self.device = torch.device(device)
        self.precision = precision
        self.media = media or build_media_tokenizer(cfg, self.device)
        self.encode_text = encode_text or build_text_conditioner(cfg.text, self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        modalities: Sequence[str] = ("image",),
        steps: int = 30,
        sampler: str = "euler",
        cfg_scale: float = 1.0,
        shift: float = 1.0,
        interval: tuple[float, float] = (0.0, 1.0),
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Tensor]:
        """One sample per (prompt, seed); media tokens of all `modalities` are sampled jointly.
        `progress` shows a bar of velocity evaluations (each one conditional + unconditional under CFG).
        `should_stop` is asked before every model forward; when it says yes the whole batch is abandoned
        with `samplers.SamplingStopped`."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(samplers.SAMPLERS)}")
        spec, mods = self.cfg.spec, list(modalities)
        sizes = [spec.tokens(m) for m in mods]
        width = max(spec.token_dim(m) for m in mods)  # tokens of all modalities share one noise tensor
        ids = self.media.position_ids(mods).to(self.device)  # [L, 4]
        txt, mask = self.encode_text(list(prompts))
        drop = torch.ones(len(prompts), dtype=torch.bool, device=self.device)
        with autocast(self.device, self.precision):  # caption and positions: once, not once per step
            conds = {u: self.model.condition(ids, txt, mask, drop if u else None) for u in (False, True)}

        def split(x: Tensor) -> dict[str, Tensor]:  # [B, L, width] -> {m: [B, L_m, C_m]}
            parts = x.split(sizes, dim=1)
            return {m: p[..., : spec.token_dim(m)] for m, p in zip(mods, parts, strict=True)}

        def velocity(x: Tensor, t: Tensor, uncond: bool) -> Tensor:
            with autocast(self.device, self.precision):
                v = self.model(split(x), ids, t, None, cond=conds[uncond]).velocity
            # back to one [B, L, width] tensor, zero in the channels a modality does not use
            return torch.cat([F.pad(v[m].float(), (0, width - v[m].shape[-1])) for m in mods], dim=1)

        cond, uncond = (lambda x, t: velocity(x, t, False)), (lambda x, t: velocity(x, t, True))
        if should_stop is not None:
            cond, uncond = samplers.stoppable(cond, should_stop), samplers.stoppable(uncond, should_stop)
        v_fn = samplers.cfg(cond, uncond, cfg_scale, interval)
        bar = tqdm(total=samplers.evaluations(sampler, steps), unit="eval", disable=not progress, leave=False)

        def counted(x: Tensor, t: Tensor) -> Tensor:
            bar.update()
            return v_fn(x, t)

        x1 = samplers.initial_noise((sum(sizes), width), list(seeds), device=self.device)  # [B, L, width]
        kw = {"noise": list(seeds)} if sampler == "euler_maruyama" else {}
        with bar:
            x0 = samplers.sample(sampler, counted, x1, steps, shift, **kw)
        return {m: media.float().cpu() for m, media in self.media.decode(split(x0)).items()}


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, nrow: int = 0, pad: int = 2) -> Image.Image:
    """[N, C, H, W] in [-1, 1] -> one PIL image, `nrow` per row (default: about square)."""
    pix = to_uint8(images)
    n, h, w, c = pix.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = pix[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save a PNG atomically (temporary file in the target folder, then rename)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
