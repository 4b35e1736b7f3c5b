"""PyAV / soundfile media I/O: spec-shaped clips, audio-video alignment, errors on short or broken input."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import soundfile

from selfflow.configs import load_config
from selfflow.data.avio import decode_audio, decode_av, encode_mp4, probe

SPEC = dataclasses.replace(load_config("small").spec, height=32, width=32)  # 2 s, 8 fps, 16 kHz mono
EVENTS = (0.75, 1.5, 2.25)  # seconds: a white frame and a click at each


def events_clip(fps: int = 16, rate: int = 16_000, seconds: float = 3.0) -> bytes:
    video = np.zeros((int(seconds * fps), 32, 32, 3), np.uint8)  # [T, H, W, 3]
    audio = np.zeros((1, int(seconds * rate)), np.float32)  # [C, N]
    for e in (e for e in EVENTS if e < seconds):
        video[round(e * fps), 8:24, 8:24] = 255
        audio[0, round(e * rate) : round(e * rate) + 160] = 0.8
    return encode_mp4(video, fps, audio, rate)


def flashes(clip) -> list[int]:
    return np.nonzero(clip.video.reshape(len(clip.video), -1).mean(1) > 20)[0].tolist()


def onsets(audio: np.ndarray, level: float = 0.3) -> list[int]:
    env = np.abs(audio[0])
    return [i for i in range(1, env.size) if env[i] > level >= env[i - 1]]


@pytest.mark.parametrize("start", [0.0, 0.5])
def test_events_land_on_the_same_time_in_video_and_audio(start):
    clip = decode_av(events_clip(), SPEC, start)
    assert clip.video.shape == (SPEC.num_frames, 32, 32, 3) and clip.video.dtype == np.uint8
    assert clip.audio.shape == (1, SPEC.num_samples) and clip.audio.dtype == np.float32
    video_times = [start + i / SPEC.fps for i in flashes(clip)]
    audio_times = [start + i / SPEC.sample_rate for i in onsets(clip.audio)]
    inside = [e for e in EVENTS if start <= e < start + SPEC.duration]
    assert video_times == pytest.approx(inside)
    assert audio_times == pytest.approx(inside, abs=1e-3)  # within 1 ms after AAC round trip


def test_encoding_is_deterministic_and_probe_reads_the_streams():
    data = events_clip()
    decode_av(
        data, SPEC, audio=False
    )  # stops mid-stream: frees decoder buffers, which once changed x264 output
    assert events_clip() == data
    info = probe(data)
    assert info.has_video and info.has_audio and info.fps == 16 and (info.width, info.height) == (32, 32)
    assert info.sample_rate == 16_000 and info.duration == pytest.approx(3.0, abs=0.07)


def test_short_or_broken_media_are_value_errors():
    data = events_clip(seconds=1.0)
    with pytest.raises(ValueError, match="clip needs|covers"):
        decode_av(data, SPEC)  # 1 s of media for a 2 s clip
    with pytest.raises(ValueError):
        decode_av(data[: len(data) // 3], SPEC)
    silent = encode_mp4(np.zeros((32, 32, 32, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="no audio stream"):
        decode_av(silent, SPEC)
    assert decode_av(silent, SPEC, audio=False).audio is None


def test_wav_is_resampled_to_the_spec_rate_keeping_event_times():
    rate = 44_100
    wave = np.zeros((int(2.5 * rate), 2), np.float32)  # [N, C] stereo
    wave[round(1.25 * rate) : round(1.25 * rate) + 400] = 0.9
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="WAV")
    audio = decode_audio(buf.getvalue(), SPEC)
    assert audio.shape == (1, SPEC.num_samples)
    assert [i / SPEC.sample_rate for i in onsets(audio)] == pytest.approx([1.25], abs=1e-3)
    with pytest.raises(ValueError):
        decode_audio(b"RIFF0000WAVEjunk", SPEC)


@pytest.mark.parametrize("size", [64])
def test_noisy_clips_encode_to_the_same_bytes_every_time(size):
    rng = np.random.default_rng(size)
    for c in range(4):
        video = np.full((16, size, size, 3), 30, np.uint8)  # [T, H, W, 3]
        for f in range(16):
            x = (3 * f + c) % (size - 8)
            video[f, 16:24, x : x + 8] = (255, 10 * c, 0)
        video = np.clip(video + rng.integers(0, 20, video.shape), 0, 255).astype(np.uint8)
        assert len({encode_mp4(video, 8) for _ in range(4)}) == 1


def test_a_late_window_is_reached_by_seeking_and_equals_the_same_part_of_a_whole_decode():
    fps, rate, seconds = 8, 16_000, 60
    video = np.zeros((fps * seconds, 32, 32, 3), np.uint8)  # [T, H, W, 3]: every frame different
    video[..., 0] = (np.arange(fps * seconds) % 256)[:, None, None]
    video[..., 1] = (np.arange(fps * seconds) // 256 * 40)[:, None, None]
    audio = (0.3 * np.sin(np.arange(seconds * rate) * 0.01)).astype(np.float32)[None]
    data = encode_mp4(video, fps, audio, rate)
    spec = dataclasses.replace(SPEC, fps=fps, duration=1.0)
    whole = decode_av(data, dataclasses.replace(spec, duration=float(seconds)))
    for start in (0.5, 5.0, 50.0):  # the last two seek to a keyframe instead of decoding from 0
        clip = decode_av(data, spec, start)
        i, j = round(start * fps), round(start * rate)
        assert np.array_equal(clip.video, whole.video[i : i + fps]), start
        assert np.array_equal(clip.audio, whole.audio[:, j : j + rate]), start
