"""Audio pieces: recorded or synthesized speech, impact sounds, onset detection and FLAC bytes.

Waveforms are float32 mono arrays in [-1, 1]. Resampling uses libswresample through PyAV, so
it is deterministic and needs no SciPy.
"""

from __future__ import annotations

import functools
import io

import av
import numpy as np
import soundfile as sf

from selfflow.data.packaged import (
    ASTERISK_VOICE,
    FLITE_VOICES,
    asterisk_prompt,
    flite_wav,
    has_asterisk_prompts,
)

VOICES = ("auto", "asterisk", "flite")
_WINDOW_S = 0.01  # analysis window of speech_bounds
_SPEECH_LEVEL = 0.005  # window RMS (relative to the peak) that counts as speech: about -46 dB


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """float32 [S] at rate_in -> float32 [S * rate_out / rate_in] at rate_out."""
    if rate_in == rate_out:
        return audio.astype(np.float32)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = rate_in
    chunks = resampler.resample(frame) + resampler.resample(None)  # None flushes the filter tail
    return np.concatenate([chunk.to_ndarray()[0] for chunk in chunks]).astype(np.float32)


def read_wav(data: bytes | str, rate: int) -> np.ndarray:
    """A wav file (bytes or path) as float32 [S] at `rate`, channels averaged."""
    audio, rate_in = sf.read(io.BytesIO(data) if isinstance(data, bytes) else data, dtype="float32")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)  # [S, C] -> [S]
    return resample(audio, rate_in, rate)


def speech_bounds(audio: np.ndarray, rate: int) -> tuple[int, int]:
    """(first, last + 1) sample of the 10 ms windows louder than _SPEECH_LEVEL of the peak."""
    hop = max(1, round(rate * _WINDOW_S))
    count = len(audio) // hop
    rms = np.sqrt(np.mean(audio[: count * hop].reshape(count, hop) ** 2, axis=1))  # [count]
    loud = np.flatnonzero(rms > _SPEECH_LEVEL * np.abs(audio).max())
    if len(loud) == 0:
        raise ValueError("the recording is silent")
    return int(loud[0] * hop), int((loud[-1] + 1) * hop)


def resolve_voice(voice: str) -> str:
    """ "auto" -> "asterisk" when the recorded prompts are installed, else "flite"."""
    if voice not in VOICES:
        raise ValueError(f"--voice must be one of {VOICES}, not {voice!r}")
    if voice == "auto":
        return "asterisk" if has_asterisk_prompts() else "flite"
    return voice


@functools.lru_cache(maxsize=512)
def spoken(prompt: str, text: str, voice: str, speaker: int, rate: int) -> tuple[np.ndarray, str]:
    """The speech of one word trimmed to its bounds, peak 1, and the speaker's name.

    prompt: the Asterisk file (e.g. "digits/4"); text: what flite says instead; speaker: which
    flite voice (Asterisk has one speaker)."""
    if voice == "asterisk":
        audio, name = read_wav(str(asterisk_prompt(prompt)), rate), ASTERISK_VOICE
    else:
        flite_voice = FLITE_VOICES[speaker % len(FLITE_VOICES)]
        audio, name = read_wav(flite_wav(text, flite_voice), rate), f"flite-{flite_voice}"
    start, end = speech_bounds(audio, rate)
    speech = audio[start:end] / np.abs(audio[start:end]).max()  # [S'] speech only, peak 1
    speech.setflags(write=False)  # cached: callers must copy before changing it
    return speech, name


def impact(rng: np.random.Generator, rate: int, strength: float) -> np.ndarray:
    """A short thud: a decaying low tone plus a noise burst, loudest at sample 0 (sharp onset)."""
    length = round(0.12 * rate)
    t = np.arange(length) / rate  # [L] seconds
    pitch = rng.uniform(140, 420)
    tone = np.sin(2 * np.pi * pitch * t + np.pi / 2) * np.exp(-t / rng.uniform(0.02, 0.04))
    burst = rng.standard_normal(length) * np.exp(-t / 0.004)
    sound = 0.7 * tone + 0.3 * burst
    return (strength * sound / np.abs(sound).max()).astype(np.float32)


def mix(track: np.ndarray, sound: np.ndarray, start: int) -> None:
    """Add `sound` into `track` from sample `start` on, cut at the track's end."""
    end = min(len(track), start + len(sound))
    track[start:end] += sound[: end - start]


def noise_floor(rng: np.random.Generator, length: int, level: float = 1e-3) -> np.ndarray:
    """Faint white noise so that silence is not digital zero (as in a real recording)."""
    return (rng.standard_normal(length) * level).astype(np.float32)


def energy_onsets(audio: np.ndarray, rate: int, level: float = 0.05, gap_s: float = 0.1) -> list[float]:
    """Times (s) where the 4 ms RMS first rises above `level` (relative to the loudest window),
    at least `gap_s` after the previous onset."""
    hop = max(1, round(rate * 0.004))
    count = len(audio) // hop
    rms = np.sqrt(np.mean(audio[: count * hop].reshape(count, hop) ** 2, axis=1))  # [count]
    above = np.concatenate([[False], rms > level * rms.max()])  # [count + 1]
    onsets: list[float] = []
    for index in np.flatnonzero(above[1:] & ~above[:-1]):
        time = index * hop / rate
        if not onsets or time - onsets[-1] >= gap_s:
            onsets.append(time)
    return onsets


def flac_bytes(audio: np.ndarray, rate: int) -> bytes:
    """16-bit mono FLAC of float32 [S]."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1, 1), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
