"""One dataclass for the geometry of a training clip (like MMAudio's SequenceConfig).

From duration, fps, sample rate, codec strides and patch sizes it derives frame and sample counts,
token grids, token counts and token widths, asserting that everything divides. Media tensors are
channels-first: image [B, C, H, W], video [B, C, T, H, W], audio [B, C, N] (codec latents alike).

Token positions use four named rotary axes (t, h, w, l). The time axis counts in ticks of 10 ms
shared by every modality, so a video frame and the audio it overlaps get the same time id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AXES = ("t", "h", "w", "l")
TICKS_PER_SECOND = 100  # one time unit = 10 ms
MODALITIES = ("image", "video", "audio")


def _whole(value: float, what: str) -> int:
    n = round(value)
    if n <= 0 or not math.isclose(value, n, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"{what} = {value} is not a positive whole number")
    return n


def _divide(total: int, part: int, what: str) -> int:
    if part <= 0 or total % part:
        raise ValueError(f"{what}: {total} is not divisible by {part}")
    return total // part


@dataclass(frozen=True)
class ClipSpec:
    # video / audio clip
    duration: float = 2.0  # seconds
    fps: float = 16.0
    height: int = 64
    width: int = 64
    sample_rate: int = 16_000
    # still images
    image_height: int = 64
    image_width: int = 64
    # pixel / waveform channels
    video_channels: int = 3
    audio_channels: int = 1
    # codec geometry (identity codecs: latent = pixels / waveform, strides 1)
    image_latent_channels: int = 3
    video_latent_channels: int = 3
    audio_latent_channels: int = 1
    space_stride: int = 1  # pixels per latent pixel, images and video
    time_stride: int = 1  # video frames per latent frame
    # causal video codecs (Wan): the first frame is a latent frame alone, then every `time_stride`
    # frames make one, so T frames give 1 + (T - 1) / time_stride latent frames
    causal_time: bool = False
    audio_stride: int = 1  # waveform samples per latent frame
    # patch sizes, in latent units
    image_patch: int = 8
    video_patch: tuple[int, int, int] = (1, 8, 8)  # (t, h, w)
    audio_patch: int = 640  # latent frames per token (640 samples = 40 ms at 16 kHz)

    def __post_init__(self) -> None:
        object.__setattr__(self, "video_patch", tuple(self.video_patch))
        if len(self.video_patch) != 3:
            raise ValueError(f"video_patch must be (t, h, w), got {self.video_patch}")
        for name in ("image_grid", "video_grid", "audio_grid"):
            getattr(self, name)  # every derived size divides, or a ValueError names the culprit

    # ------------------------------------------------------------------ frames and samples
    @property
    def num_frames(self) -> int:
        return _whole(self.duration * self.fps, "duration * fps (video frames)")

    @property
    def num_samples(self) -> int:
        return _whole(self.duration * self.sample_rate, "duration * sample_rate (audio samples)")

    # ------------------------------------------------------------------ token grids
    @property
    def image_grid(self) -> tuple[int, int]:
        h = _divide(
            _divide(self.image_height, self.space_stride, "image height / codec"), self.image_patch, "image h"
        )
        w = _divide(
            _divide(self.image_width, self.space_stride, "image width / codec"), self.image_patch, "image w"
        )
        return h, w

    @property
    def video_grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.video_patch
        frames = self.video_latent_frames
        return (
            _divide(frames, pt, "latent frames / video time patch"),
            _divide(_divide(self.height, self.space_stride, "video height / codec"), ph, "video h patches"),
            _divide(_divide(self.width, self.space_stride, "video width / codec"), pw, "video w patches"),
        )

    @property
    def video_latent_frames(self) -> int:
        if self.causal_time:
            rest = _divide(
                self.num_frames - 1, self.time_stride, "video frames after the first / causal stride"
            )
            return 1 + rest
        return _divide(self.num_frames, self.time_stride, "video frames / codec time stride")

    def latent_frame_start(self, index: int) -> int:
        """The first video frame a latent frame covers (causal: frame 0 alone, then groups)."""
        if self.causal_time:
            return 0 if index == 0 else 1 + (index - 1) * self.time_stride
        return index * self.time_stride

    @property
    def audio_grid(self) -> int:
        frames = _divide(self.num_samples, self.audio_stride, "audio samples / codec stride")
        return _divide(frames, self.audio_patch, "audio latent frames / audio patch")

    def latent_shape(self, modality: str) -> tuple[int, ...]:
        """One sample's codec latents, channels first: image [C, h, w], video [C, T', h, w], audio [C, n]."""
        space = self.space_stride
        if modality == "image":
            return self.image_latent_channels, self.image_height // space, self.image_width // space
        if modality == "video":
            return (
                self.video_latent_channels,
                self.video_latent_frames,
                self.height // space,
                self.width // space,
            )
        if modality == "audio":
            return self.audio_latent_channels, self.num_samples // self.audio_stride
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def tokens(self, modality: str) -> int:
        grids = {"image": self.image_grid, "video": self.video_grid, "audio": (self.audio_grid,)}
        if modality not in grids:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return math.prod(grids[modality])

    def token_dim(self, modality: str) -> int:
        """Channels of one token: latent channels times patch volume."""
        if modality == "image":
            return self.image_latent_channels * self.image_patch**2
        if modality == "video":
            return self.video_latent_channels * math.prod(self.video_patch)
        if modality == "audio":
            return self.audio_latent_channels * self.audio_patch
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    # ------------------------------------------------------------------ time ids
    @property
    def video_token_ticks(self) -> float:
        """Time between consecutive video token rows, in 10 ms ticks."""
        return self.video_patch[0] * self.time_stride / self.fps * TICKS_PER_SECOND

    @property
    def audio_token_ticks(self) -> float:
        """Time between consecutive audio tokens, in 10 ms ticks."""
        return self.audio_patch * self.audio_stride / self.sample_rate * TICKS_PER_SECOND
