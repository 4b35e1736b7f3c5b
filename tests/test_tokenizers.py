"""Tests for selfflow.tokenizers.{spec,image,video,audio,codecs,media} (CPU, offline, no mocks).

Covers: exact identity round trips, pinned patch layouts and position ids, video/audio time-id
alignment (the same instant gets the same time id in both modalities) and spec validation.
Autoencoder codecs are in test_codecs.py.
"""

from __future__ import annotations

import pytest
import torch

from selfflow.configs.schema import ConfigError, load_config
from selfflow.tokenizers.audio import AudioPatchifier
from selfflow.tokenizers.image import ImagePatchifier
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tokenizers.spec import AXES, TICKS_PER_SECOND, ClipSpec
from selfflow.tokenizers.video import VideoPatchifier


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def covering_token_start(ids: torch.Tensor, tau: float) -> float:
    """Time id of the latest video/audio token that starts at or before instant tau (ticks)."""
    starts = torch.unique(ids[:, 0])
    return float(starts[starts <= tau].max())


# ---------------------------------------- specs
# A small clip: 0.5 s at 16 fps (8 frames) of 16x24 pixels and 8000 samples at 16 kHz in 320-sample
# (20 ms) tokens; 2 audio channels exercise channel-major audio tokens.
SMALL = ClipSpec(
    duration=0.5,
    fps=16,
    height=16,
    width=24,
    image_height=16,
    image_width=24,
    audio_channels=2,
    audio_latent_channels=2,
    image_patch=4,
    video_patch=(2, 4, 4),
    audio_patch=320,
)


# ---------------------------------------- spec
def test_default_spec_derived_numbers() -> None:
    spec = ClipSpec()
    # 2 s * 16 fps = 32 frames; 2 s * 16 kHz = 32000 samples
    assert spec.num_frames == 32
    assert spec.num_samples == 32_000
    # 64 / 8 = 8 patches per side; video: 32 frames / 1, 64 / 8, 64 / 8; audio 32000 / 640 = 50
    assert spec.image_grid == (8, 8)
    assert spec.video_grid == (32, 8, 8)
    assert spec.audio_grid == 50
    assert spec.tokens("image") == 64
    assert spec.tokens("video") == 32 * 64
    assert spec.tokens("audio") == 50
    assert spec.token_dim("image") == 3 * 8 * 8
    assert spec.token_dim("video") == 3 * 1 * 8 * 8
    assert spec.token_dim("audio") == 1 * 640
    # 10 ms ticks: one frame at 16 fps = 62.5 ms = 6.25 ticks; 640 samples at 16 kHz = 40 ms = 4 ticks
    assert TICKS_PER_SECOND == 100
    assert spec.video_token_ticks == 6.25
    assert spec.audio_token_ticks == 4.0
    assert AXES == ("t", "h", "w", "l")


def test_small_spec_derived_numbers() -> None:
    assert SMALL.num_frames == 8
    assert SMALL.num_samples == 8000
    assert SMALL.image_grid == (4, 6)
    assert SMALL.video_grid == (4, 4, 6)
    assert SMALL.audio_grid == 25
    assert SMALL.token_dim("video") == 3 * 2 * 4 * 4
    assert SMALL.token_dim("audio") == 2 * 320
    assert SMALL.video_token_ticks == 12.5  # two frames of 62.5 ms
    assert SMALL.audio_token_ticks == 2.0  # 20 ms


def test_codec_strides_enter_grids_and_ticks() -> None:
    spec = ClipSpec(
        space_stride=8, time_stride=4, audio_stride=64, image_patch=2, video_patch=(1, 2, 2), audio_patch=10
    )
    assert spec.image_grid == (4, 4)  # 64 / 8 / 2
    assert spec.video_grid == (8, 4, 4)  # 32 frames / 4
    assert spec.audio_grid == 50  # 32000 / 64 / 10
    assert spec.video_token_ticks == 25.0  # 4 frames at 16 fps = 250 ms
    assert spec.audio_token_ticks == 4.0  # 640 samples = 40 ms


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"duration": 1.0, "fps": 12.5}, "duration * fps"),  # 12.5 frames
        ({"duration": 0.0}, "duration * fps"),  # zero frames is not a clip
        ({"duration": 0.0625, "sample_rate": 22_050, "video_patch": (1, 8, 8)}, "duration * sample_rate"),
        ({"height": 60}, "video h patches"),
        (
            {"height": 63, "space_stride": 2, "video_patch": (1, 1, 1), "image_patch": 1},
            "video height / codec",
        ),
        ({"width": 72, "video_patch": (1, 8, 16)}, "video w patches"),
        ({"image_height": 60}, "image h"),
        ({"image_width": 68}, "image w"),
        ({"image_width": 65, "space_stride": 2, "image_patch": 4}, "image width / codec"),
        ({"time_stride": 3}, "video frames / codec time stride"),
        ({"video_patch": (5, 8, 8)}, "latent frames / video time patch"),
        ({"audio_patch": 700}, "audio latent frames / audio patch"),
        ({"audio_stride": 3}, "audio samples / codec stride"),
        ({"video_patch": (8, 8)}, "video_patch"),
    ],
)
def test_spec_validation_names_the_quantity(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        ClipSpec(**kwargs)


def test_spec_height_not_divisible_message() -> None:
    # 60 / stride 1 = 60 latent rows, not divisible by the 8-pixel patch: "video h patches"
    with pytest.raises(ValueError, match="video h patches: 60 is not divisible by 8"):
        ClipSpec(height=60)


def test_spec_unknown_modality_token_dim() -> None:
    with pytest.raises(ValueError, match="unknown modality"):
        ClipSpec().token_dim("text")


def test_spec_is_frozen_and_normalises_video_patch() -> None:
    spec = ClipSpec(video_patch=[1, 8, 8])
    assert spec.video_patch == (1, 8, 8)
    assert spec == ClipSpec()
    with pytest.raises(AttributeError):
        spec.fps = 8  # type: ignore[misc]


# ---------------------------------------- round trip
@pytest.mark.parametrize(
    ("modality", "shape"),
    [
        ("image", (2, 3, 16, 24)),
        ("video", (2, 3, 8, 16, 24)),
        ("audio", (3, 2, 8000)),
    ],
)
def test_identity_round_trip_single_modality(modality: str, shape: tuple[int, ...]) -> None:
    tok = MediaTokenizer(SMALL)
    x = randn(*shape)
    tokens, ids = tok.encode({modality: x})
    assert list(tokens) == [modality]
    z = tokens[modality]
    assert z.shape == (shape[0], SMALL.tokens(modality), SMALL.token_dim(modality))
    assert ids.shape == (SMALL.tokens(modality), len(AXES))
    assert tok.token_channels()[modality] == SMALL.token_dim(modality)
    out = tok.decode(tokens)
    assert list(out) == [modality]
    assert out[modality].shape == x.shape
    assert torch.equal(out[modality], x)


def test_codec_gain_scales_tokens_and_round_trips() -> None:
    x = {"video": randn(2, 3, 8, 16, 24), "audio": randn(2, 2, 8000) * 0.03}
    plain, scaled = MediaTokenizer(SMALL), MediaTokenizer(SMALL, scales={"audio": 8.0})
    a, b = plain.encode(x)[0], scaled.encode(x)[0]
    assert torch.equal(b["video"], a["video"])
    torch.testing.assert_close(b["audio"], 8.0 * a["audio"])
    out = scaled.decode(b)
    assert torch.equal(out["video"], x["video"])
    torch.testing.assert_close(out["audio"], x["audio"])


@pytest.mark.parametrize("scales", [{"speech": 2.0}, {"audio": 0.0}])
def test_bad_codec_gains_rejected(scales: dict) -> None:
    with pytest.raises(ConfigError, match="codecs.scales"):
        load_config("tiny", [f"codecs.scales={scales}"])


def test_identity_round_trip_default_spec_joint() -> None:
    spec = ClipSpec()
    tok = MediaTokenizer(spec)
    media = {"video": randn(1, 3, 32, 64, 64, seed=1), "audio": randn(1, 1, 32_000, seed=2)}
    tokens, ids = tok.encode(media)
    assert list(tokens) == ["video", "audio"]
    for m in media:
        assert tokens[m].shape == (1, spec.tokens(m), spec.token_dim(m))
    n_video, n_audio = spec.tokens("video"), spec.tokens("audio")
    assert ids.shape == (n_video + n_audio, 4)
    # packed in dict order: video first, then audio
    assert torch.equal(ids[:n_video], VideoPatchifier(spec).position_ids())
    assert torch.equal(ids[n_video:], AudioPatchifier(spec).position_ids())
    assert torch.equal(ids, tok.position_ids(["video", "audio"]))
    out = tok.decode(tokens)
    for m, x in media.items():
        assert torch.equal(out[m], x)


def test_packed_ids_follow_dict_order() -> None:
    tok = MediaTokenizer(SMALL)
    media = {"audio": randn(1, 2, 8000), "video": randn(1, 3, 8, 16, 24)}
    tokens, ids = tok.encode(media)
    assert list(tokens) == ["audio", "video"]
    n_audio = SMALL.tokens("audio")
    assert torch.equal(ids[:n_audio], AudioPatchifier(SMALL).position_ids())
    assert torch.equal(ids[n_audio:], VideoPatchifier(SMALL).position_ids())


def test_all_three_modalities_together() -> None:
    tok = MediaTokenizer(SMALL)
    media = {
        "image": randn(2, 3, 16, 24, seed=3),
        "video": randn(2, 3, 8, 16, 24),
        "audio": randn(2, 2, 8000),
    }
    tokens, ids = tok.encode(media)
    assert ids.shape[0] == sum(SMALL.tokens(m) for m in media)
    out = tok.decode(tokens)
    assert all(torch.equal(out[m], media[m]) for m in media)


# ---------------------------------------- layout
def test_image_patch_layout_and_ids() -> None:
    p = SMALL.image_patch
    gh, gw = SMALL.image_grid
    x = randn(2, 3, 16, 24)
    z = ImagePatchifier(SMALL).patchify(x)
    # token 1 is grid row 0, column 1; its features run over (c, p, q)
    assert torch.equal(z[0, 1], x[0, :, 0:p, p : 2 * p].reshape(-1))
    assert torch.equal(z[0, 1, : p * p], x[0, 0, 0:p, p : 2 * p].reshape(-1))  # channel 0 first
    assert z[0, 1, 1] == x[0, 0, 0, p + 1]  # then along the row (q fastest)
    assert z[0, 1, p] == x[0, 0, 1, p]
    for h in range(gh):
        for w in range(gw):
            patch = x[1, :, h * p : (h + 1) * p, w * p : (w + 1) * p]
            assert torch.equal(z[1, h * gw + w], patch.reshape(-1))

    ids = ImagePatchifier(SMALL).position_ids()
    assert ids.shape == (gh * gw, 4)
    assert torch.equal(ids[:, 0], torch.zeros(gh * gw))
    assert torch.equal(ids[:, 3], torch.zeros(gh * gw))
    hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    assert torch.equal(ids[:, 1], hh.reshape(-1).float())
    assert torch.equal(ids[:, 2], ww.reshape(-1).float())


def test_video_patch_layout_and_ids() -> None:
    pt, ph, pw = SMALL.video_patch
    gt, gh, gw = SMALL.video_grid
    x = randn(2, 3, 8, 16, 24)
    z = VideoPatchifier(SMALL).patchify(x)
    assert z.shape == (2, gt * gh * gw, 3 * pt * ph * pw)
    for t, h, w in [(0, 0, 0), (1, 2, 3), (3, 3, 5), (2, 0, 4)]:
        index = (t * gh + h) * gw + w
        block = x[1, :, t * pt : (t + 1) * pt, h * ph : (h + 1) * ph, w * pw : (w + 1) * pw]
        assert torch.equal(z[1, index], block.reshape(-1))  # (c, k, p, q) order
    # a token holds two consecutive frames: second frame's pixels follow the first frame's, per channel
    assert torch.equal(z[0, 0, ph * pw : 2 * ph * pw], x[0, 0, 1, :ph, :pw].reshape(-1))

    ids = VideoPatchifier(SMALL).position_ids()
    assert ids.shape == (gt * gh * gw, 4)
    assert ids.dtype == torch.float32
    grid = ids.reshape(gt, gh, gw, 4)
    for t in range(gt):
        assert torch.all(grid[t, ..., 0] == t * SMALL.video_token_ticks)
    assert torch.equal(grid[..., 1], torch.arange(gh).float()[None, :, None].expand(gt, gh, gw))
    assert torch.equal(grid[..., 2], torch.arange(gw).float()[None, None, :].expand(gt, gh, gw))
    assert torch.all(grid[..., 3] == 0)
    # row t starts at frame t * pt, i.e. at t * pt / fps seconds
    assert grid[3, 0, 0, 0] == 3 * pt / SMALL.fps * TICKS_PER_SECOND == 37.5


def test_audio_patch_layout_and_ids() -> None:
    p = SMALL.audio_patch
    x = randn(2, 2, 8000)
    z = AudioPatchifier(SMALL).patchify(x)
    assert z.shape == (2, 25, 2 * p)
    for j in [0, 1, 7, 24]:
        # channel-major: all of channel 0's samples for [j p, (j+1) p), then channel 1's
        assert torch.equal(z[1, j, :p], x[1, 0, j * p : (j + 1) * p])
        assert torch.equal(z[1, j, p:], x[1, 1, j * p : (j + 1) * p])

    ids = AudioPatchifier(SMALL).position_ids()
    assert ids.shape == (25, 4)
    assert torch.equal(ids[:, 0], torch.arange(25).float() * SMALL.audio_token_ticks)
    assert torch.all(ids[:, 1:] == 0)


# ---------------------------------------- time alignment
def test_time_ids_coincide_when_token_durations_match() -> None:
    # 25 fps -> 40 ms frames; 640 samples at 16 kHz -> 40 ms audio tokens
    spec = ClipSpec(duration=2.0, fps=25, height=16, width=16, audio_patch=640)
    assert spec.video_token_ticks == spec.audio_token_ticks == 4.0
    tok = MediaTokenizer(spec)
    _, ids = tok.encode({"video": torch.zeros(1, 3, 50, 16, 16), "audio": torch.zeros(1, 1, 32_000)})
    gt, gh, gw = spec.video_grid
    assert gt == spec.audio_grid == 50
    video_t = ids[: gt * gh * gw, 0].reshape(gt, gh * gw)
    audio_t = ids[gt * gh * gw :, 0]
    for k in range(gt):
        assert torch.all(video_t[k] == audio_t[k]), k
    assert audio_t[-1] == 49 * 4.0


def test_time_ids_coincide_at_shared_instants_with_different_rates() -> None:
    # 8 fps -> 125 ms frames (12.5 ticks); 640 samples at 16 kHz -> 40 ms tokens (4 ticks)
    spec = ClipSpec(duration=2.0, fps=8, height=8, width=8, audio_patch=640)
    tok = MediaTokenizer(spec)
    _, ids = tok.encode({"video": torch.zeros(1, 3, 16, 8, 8), "audio": torch.zeros(1, 1, 32_000)})
    n_video = spec.tokens("video")
    video_ids, audio_ids = ids[:n_video], ids[n_video:]
    video_starts = set(video_ids[:, 0].tolist())
    audio_starts = set(audio_ids[:, 0].tolist())
    # instants that start both a frame and an audio token: multiples of lcm(125 ms, 40 ms) = 1 s
    assert video_starts & audio_starts == {0.0, 100.0}
    assert video_ids[8, 0] == audio_ids[25, 0] == 100.0  # frame 8 and audio token 25 both start at 1 s
    # every instant: the covering frame and covering audio token are less than one token apart
    longest = max(spec.video_token_ticks, spec.audio_token_ticks)
    for tau in torch.arange(0, 200, 0.5).tolist():
        v = covering_token_start(video_ids, tau)
        a = covering_token_start(audio_ids, tau)
        assert v <= tau < v + spec.video_token_ticks
        assert a <= tau < a + spec.audio_token_ticks
        assert abs(v - a) < longest


def test_physical_event_gets_the_same_time_id_in_both_modalities() -> None:
    spec = ClipSpec(duration=2.0, fps=8, height=16, width=16, audio_patch=640)
    video = torch.zeros(1, 3, 16, 16, 16)
    video[:, :, 8] = 1.0  # the frame that starts at 1.0 s (8 fps)
    audio = torch.zeros(1, 1, 32_000)
    audio[:, :, 16_000] = 1.0  # click at 1.0 s
    tokens, ids = MediaTokenizer(spec).encode({"video": video, "audio": audio})
    n_video = spec.tokens("video")
    lit_video = tokens["video"][0].abs().sum(-1) > 0
    lit_audio = tokens["audio"][0].abs().sum(-1) > 0
    assert int(lit_video.sum()) == 4  # the 2x2 spatial tokens of one frame
    assert int(lit_audio.sum()) == 1
    video_times = ids[:n_video][lit_video, 0]
    audio_times = ids[n_video:][lit_audio, 0]
    assert torch.all(video_times == 100.0)
    assert torch.equal(audio_times, torch.tensor([100.0]))


def test_event_alignment_with_codec_strides() -> None:
    # time_stride folds 2 frames per latent frame, audio_stride 4 samples per latent frame
    spec = ClipSpec(duration=2.0, fps=8, height=8, width=8, time_stride=2, audio_stride=4, audio_patch=400)
    assert spec.video_token_ticks == 25.0 and spec.audio_token_ticks == 10.0
    assert spec.video_grid[0] == 8 and spec.audio_grid == 20
    vp, ap = VideoPatchifier(spec).position_ids(), AudioPatchifier(spec).position_ids()
    # latent frame 4 holds frames 8-9 (start 1.0 s); audio token 10 holds samples 16000.. (1.0 s)
    assert vp[4, 0] == ap[10, 0] == 100.0
