"""The video metrics on real benchmark clips: A/V offset calibration, mismatched-audio and shuffled-frame
controls, and what bad input gives.

Clips are built once per module with tools/make_benchmark.py (in-process) at the default model's size
(32x32, 12 fps) and the benchmark's (64x64, 16 fps), then decoded with selfflow.data.avio.decode_av.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from selfflow.data.avio import decode_av
from selfflow.data.packaged import has_asterisk_prompts
from selfflow.metrics.avsync import AVClip, audio_onsets, av_offsets, shift_audio, sync_report, visual_events
from selfflow.metrics.temporal import shuffled_control, temporal_report, warping_error
from selfflow.tokenizers.spec import ClipSpec
from selfflow.tools import make_benchmark

SIZES = {"32": (32, 12), "64": (64, 16)}  # name -> (side, fps)
RATE = 16_000
HAS_SPEECH = has_asterisk_prompts() or Path("/usr/bin/flite").is_file()


def spec_for(side: int, fps: int) -> ClipSpec:
    return ClipSpec(
        duration=3.0, fps=fps, height=side, width=side, sample_rate=RATE, image_height=side,
        image_width=side, image_patch=4, video_patch=(1, 8, 8), audio_patch=640,
    )  # fmt: skip


def build(
    out: Path, task: str, side: int, fps: int, extra: list[str]
) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """(video uint8 [T, H, W, 3], audio float32 [1, N] or None, json) of every clip of a fresh build."""
    argv = ["--task", task, "--seed", "5", "--resolution", f"{side}x{side}", "--fps", str(fps)]
    assert make_benchmark.main([*argv, "--duration", "3", "--out", str(out), *extra]) == 0
    clips = []
    for meta_file in sorted(out.glob("*.json")):
        media = meta_file.with_suffix(".mp4").read_bytes()
        clip = decode_av(media, spec_for(side, fps), audio=task == "av")
        clips.append((clip.video, clip.audio, json.loads(meta_file.read_text())))
    return clips


@pytest.fixture(scope="module", params=list(SIZES))
def av_clips(request, tmp_path_factory) -> tuple[int, list[tuple[np.ndarray, np.ndarray, dict]]]:
    """(fps, clips) of 8 mixed scenes (4 balls, 4 digits; only balls without a speech voice)."""
    side, fps = SIZES[request.param]
    scene = "mixed" if HAS_SPEECH else "ball"
    out = tmp_path_factory.mktemp(f"av{side}") / "clips"
    return fps, build(out, "av", side, fps, ["--scene", scene, "--n", "8"])


def report(fps: int, clips: list, shift: float = 0.0, audio_from: int = 0) -> dict:
    """sync_report of the clips, audio shifted by `shift` s or taken from the clip `audio_from` later
    among those of the same scene."""
    items = []
    for scene in ("ball", "digit"):
        same = [c for c in clips if c[2]["scene"] == scene]
        for i, (video, _, _) in enumerate(same):
            audio = shift_audio(same[(i + audio_from) % len(same)][1], shift, RATE)
            items.append(AVClip(video, audio, fps, RATE, scene))
    return sync_report(items)


# ---------------------------------------------------------------------- A/V sync
def test_events_match_the_ground_truth(av_clips):
    fps, clips = av_clips
    for video, audio, meta in clips:
        assert visual_events(video, fps, meta["scene"]) == pytest.approx(meta["event_times"])
        offsets = av_offsets(video, audio, fps, RATE, meta["scene"])
        assert len(offsets) == len(meta["event_times"]) and max(map(abs, offsets)) < 0.015


@pytest.mark.parametrize("injected", [-0.08, -0.04, 0.0, 0.04, 0.08])
def test_injected_offsets_are_recovered_within_20ms(av_clips, injected):
    fps, clips = av_clips
    result = report(fps, clips, shift=injected)
    assert result["n_clips"] == len(clips) and result["n_matched"] == result["n_events"] > len(clips)
    assert result["median_offset_s"] == pytest.approx(injected, abs=0.02)


def test_mismatched_audio_is_mostly_out_of_sync(av_clips):
    fps, clips = av_clips
    clean, mismatched = report(fps, clips), report(fps, clips, audio_from=1)
    assert clean["frac_within_frame"] >= 0.9
    assert mismatched["frac_within_frame"] <= 0.5
    assert clean["frac_within_frame"] - mismatched["frac_within_frame"] >= 0.5


def test_silent_audio_leaves_every_event_unmatched(av_clips):
    fps, clips = av_clips
    video, audio, meta = clips[0]
    silent = np.zeros_like(audio)
    assert audio_onsets(silent, RATE) == [] and audio_onsets(1e-4 * np.ones(RATE), RATE) == []
    assert av_offsets(video, silent, fps, RATE, meta["scene"]) == []
    result = sync_report([AVClip(video, silent, fps, RATE, meta["scene"])])
    assert result["n_events"] == len(meta["event_times"]) and result["n_matched"] == 0
    assert result["frac_within_frame"] == 0.0 and math.isnan(result["median_offset_s"])


def test_a_static_video_has_no_events(av_clips):
    fps, clips = av_clips
    video, audio, _ = clips[0]
    still = np.repeat(video[:1], len(video), axis=0)  # [T, H, W, 3], the first frame held
    for scene in ("ball", "digit"):
        assert av_offsets(still, audio, fps, RATE, scene) == []
    result = sync_report([(still, audio, fps, RATE, "ball")])
    assert result["n_events"] == 0 and math.isnan(result["frac_within_frame"])


def test_bad_input_raises_value_error():
    video = np.zeros((12, 32, 32, 3), np.uint8)
    audio = np.zeros((1, RATE), np.float32)
    cases = [
        (np.zeros((0, 32, 32, 3), np.uint8), audio, 12, RATE, "ball"),  # no frames
        (video.astype(np.float32), audio, 12, RATE, "ball"),  # not uint8
        (video, np.zeros((1, 0), np.float32), 12, RATE, "digit"),  # no samples
        (video, audio, 0, RATE, "ball"),
        (video, audio, 12, 0, "ball"),
        (video, audio, 12, RATE, "mixed"),  # the scene of each clip must be given
    ]
    for args in cases:
        with pytest.raises(ValueError):
            av_offsets(*args)
    with pytest.raises(ValueError):
        sync_report([])


def test_shift_audio_delays_and_advances():
    wave = np.arange(1, 11, dtype=np.float32)[None]  # [1, 10]
    assert shift_audio(wave, 0.2, 10).tolist() == [[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert shift_audio(wave, -0.2, 10).tolist() == [[3, 4, 5, 6, 7, 8, 9, 10, 0, 0]]


# ---------------------------------------------------------------------- temporal consistency
@pytest.fixture(scope="module", params=list(SIZES))
def moving_clips(request, tmp_path_factory) -> list[np.ndarray]:
    """4 videos of the video benchmark (digits moving or bouncing) at one size, as uint8 [T, H, W, 3]."""
    side, fps = SIZES[request.param]
    out = tmp_path_factory.mktemp(f"video{side}") / "clips"
    return [video for video, _, _ in build(out, "video", side, fps, ["--source", "digit", "--n", "4"])]


def test_real_videos_warp_better_than_their_shuffled_frames(moving_clips):
    for seed, video in enumerate(moving_clips):
        assert warping_error(video) < 0.6 * shuffled_control(video, seed)
    result = temporal_report(moving_clips)
    assert result["n_videos"] == len(moving_clips) and 0 < result["warping_error"] < 4
    assert result["ratio"] < 0.5


def test_av_clips_warp_better_than_their_shuffled_frames(av_clips):
    _, clips = av_clips
    result = temporal_report([video for video, _, _ in clips])
    assert result["ratio"] < 0.5


def test_temporal_bad_input():
    still = np.full((6, 16, 16, 3), 90, np.uint8)
    assert warping_error(still) == 0.0
    assert math.isnan(temporal_report([still])["ratio"])
    for bad in (np.zeros((1, 16, 16, 3), np.uint8), np.zeros((0, 16, 16, 3), np.uint8), still[..., 0]):
        with pytest.raises(ValueError):
            warping_error(bad)
    with pytest.raises(ValueError):
        temporal_report([])
