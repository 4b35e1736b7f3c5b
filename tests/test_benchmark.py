"""The benchmark builders: files, determinism, decodable media, and that every json is ground truth.

Each task is built once per module at a tiny size, in-process (make_benchmark.main). Tasks whose
Debian package is missing are skipped with the package's name.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from selfflow.data.benchmark.common import PALETTE, contrast_ratio, times_word
from selfflow.data.benchmark.emoji import emoji_caption
from selfflow.data.benchmark.media import decode_mp4
from selfflow.data.benchmark.sound import energy_onsets
from selfflow.data.benchmark.text import VOCABULARY
from selfflow.data.benchmark.video import caption_of
from selfflow.data.packaged import EMOJI_FONT, FASHION_MNIST_ROOT, has_asterisk_prompts
from selfflow.tools import make_benchmark

HAS_SPEECH = has_asterisk_prompts() or Path("/usr/bin/flite").is_file()
NEEDS = {  # task -> (available, Debian package to install)
    "text": (True, "fonts-dejavu-core"),
    "emoji": (EMOJI_FONT.is_file(), "fonts-noto-color-emoji"),
    "video": (
        EMOJI_FONT.is_file() and FASHION_MNIST_ROOT.is_dir(),
        "fonts-noto-color-emoji dataset-fashion-mnist",
    ),
    "av": (HAS_SPEECH, "asterisk-core-sounds-en-wav (or flite)"),
    "audio": (HAS_SPEECH, "asterisk-core-sounds-en-wav (or flite)"),
}
ARGS = {  # task -> extra arguments of the tiny test build
    "text": ["--n", "6"],
    "emoji": ["--n", "6"],
    "video": ["--n", "6", "--split", "test"],
    "av": ["--n", "6", "--duration", "3"],
    "audio": ["--n", "4"],
}
MEDIA = {"text": "png", "emoji": "png", "video": "mp4", "av": "mp4", "audio": "flac"}


def build(task: str, out: Path, seed: int = 3, extra: list[str] | None = None) -> Path:
    available, package = NEEDS[task]
    if not available:
        pytest.skip(f"task {task} needs Debian's {package}")
    argv = ["--task", task, "--seed", str(seed), "--out", str(out), *ARGS[task], *(extra or [])]
    assert make_benchmark.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("benchmark")
    return {task: root / task for task in NEEDS}


def folder(built: dict[str, Path], task: str) -> Path:
    """The task's folder, built on first use."""
    if not built[task].is_dir():
        build(task, built[task])
    return built[task]


def samples(path: Path) -> list[tuple[Path, str, dict]]:
    """(media file, caption, json) of every sample in a folder."""
    out = []
    for meta_file in sorted(path.glob("*.json")):
        media = next(p for p in path.glob(f"{meta_file.stem}.*") if p.suffix not in (".json", ".txt"))
        caption = meta_file.with_suffix(".txt").read_text(encoding="utf-8").strip()
        out.append((media, caption, json.loads(meta_file.read_text())))
    return out


def contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---------------------------------------------------------------------- every task
@pytest.mark.parametrize("task", sorted(NEEDS))
def test_task_writes_media_caption_and_json_per_key(built, task):
    path = folder(built, task)
    n = int(ARGS[task][1])
    names = sorted(p.name for p in path.iterdir())
    assert len(names) == 3 * n and all(name.count(".") == 1 for name in names)
    assert {Path(name).suffix for name in names} == {f".{MEDIA[task]}", ".txt", ".json"}
    assert all(caption for _, caption, _ in samples(path))


@pytest.mark.parametrize("task", sorted(NEEDS))
def test_same_seed_gives_the_same_files(built, task, tmp_path):
    first = contents(folder(built, task))
    assert contents(build(task, tmp_path / "again")) == first  # mp4s too, on one PyAV build
    assert contents(build(task, tmp_path / "other", seed=4)) != first


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    for argv in (
        ["--task", "text", "--resolution", "8x8"],
        ["--task", "video", "--duration", "0.05"],
        ["--task", "video", "--resolution", "63x64"],
        ["--task", "av", "--scene", "ball", "--n", "0"],
    ):
        assert make_benchmark.main([*argv, "--out", str(tmp_path / "out")]) == 1
        assert capsys.readouterr().err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_size_presets_fill_only_the_options_left_out(tmp_path):
    full = make_benchmark.parse_args(["--task", "text", "--size", "full", "--out", str(tmp_path)])
    assert (full.n, full.resolution) == (5_000, "64x256")
    mine = make_benchmark.parse_args(["--task", "video", "--n", "7", "--fps", "8", "--out", str(tmp_path)])
    assert (mine.n, mine.fps, mine.duration, mine.resolution) == (7, 8, 2.0, "64x64")


# ---------------------------------------------------------------------- images
def test_text_json_locates_the_word_as_drawn(built):
    for media, caption, meta in samples(folder(built, "text")):
        image = np.asarray(Image.open(media).convert("RGB")).astype(int)  # [H, W, 3]
        assert image.shape == (32, 128, 3) and caption == f'a sign that says "{meta["text"]}"'
        assert meta["word"] in VOCABULARY and meta["text"].lower() == meta["word"]
        x0, y0, x1, y1 = meta["box"]
        assert 0 < x0 < x1 < 128 and 0 < y0 < y1 < 32  # inside, with a margin
        ink = np.abs(image - meta["background_rgb"]).sum(-1) > 0  # [H, W]
        assert not ink[:y0].any() and not ink[y1:].any() and not ink[:, :x0].any() and not ink[:, x1:].any()
        assert ink[y0, x0:x1].any() and ink[y1 - 1, x0:x1].any() and ink[y0:y1, x0].any()  # box is tight
        glyph = np.abs(image[y0:y1, x0:x1] - meta["color_rgb"]).sum(-1) < 30
        assert glyph.mean() > 0.1  # the text colour really is drawn there
        assert contrast_ratio(tuple(meta["color_rgb"]), tuple(meta["background_rgb"])) >= 4.5


def test_emoji_captions_come_from_unicode_names(built):
    for media, caption, meta in samples(folder(built, "emoji")):
        name = unicodedata.name(meta["char"]).lower()
        assert meta["codepoints"] == [f"U+{ord(meta['char']):04X}"] and meta["name"] == name
        assert name in caption and caption == emoji_caption(name, meta["background"])
        image = np.asarray(Image.open(media).convert("RGB")).astype(int)
        x0, y0, x1, y1 = meta["box"]
        outside = np.ones(image.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert (image[outside] == PALETTE[meta["background"]]).all()
        assert (np.abs(image[y0:y1, x0:x1] - PALETTE[meta["background"]]).sum(-1) > 30).mean() > 0.1


def test_caption_grammar():
    assert emoji_caption("red apple", "blue") == "a red apple on a blue background"
    assert emoji_caption("books", "orange") == "books on an orange background"
    assert caption_of("an ankle boot", "bounce") == "an ankle boot bounces"
    assert caption_of("linked paperclips", "left", plural=True) == "linked paperclips move to the left"
    assert [times_word(k) for k in (1, 2, 3)] == ["once", "twice", "three times"]


# ---------------------------------------------------------------------- video
def object_centre(frame: np.ndarray, background: list[int]) -> np.ndarray:
    """Centre (x, y) of the box around every pixel that is not the background colour."""
    ys, xs = np.nonzero(np.abs(frame.astype(int) - background).sum(-1) > 60)
    return np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2])


def test_video_mp4s_decode_and_follow_their_positions(built):
    for media, caption, meta in samples(folder(built, "video")):
        clip = decode_mp4(media.read_bytes())
        assert clip.video_codec == "h264" and clip.audio is None
        assert clip.frames.shape == (32, 64, 64, 3) and clip.fps == 16 and clip.duration == pytest.approx(2.0)
        positions = np.asarray(meta["positions"])  # [T, 2]
        assert positions.shape == (32, 2) and caption.split()[-1] in caption_of("", meta["motion"])
        found = np.stack([object_centre(f, meta["background_rgb"]) for f in clip.frames])
        assert np.abs(found - positions).max() < 3.5
        if meta["motion"] in ("left", "up-left", "down-left"):
            assert found[-1, 0] < found[0, 0] - 5


# ---------------------------------------------------------------------- audio-video
def test_av_mp4_has_h264_video_and_aac_audio(built):
    for media, _, meta in samples(folder(built, "av")):
        clip = decode_mp4(media.read_bytes())
        assert (clip.video_codec, clip.audio_codec, clip.sample_rate) == ("h264", "aac", 16_000)
        assert clip.frames.shape == (48, 64, 64, 3) and clip.fps == 16 and meta["frames"] == 48
        assert 0 <= len(clip.audio) - 3 * 16_000 < 1024  # the last AAC frame is padded


def ball_heights(frames: np.ndarray, colour: list[int]) -> np.ndarray:
    """Image row of the ball's centroid per frame (grows downwards), float [T]."""
    rows = []
    for frame in frames:
        ys, _ = np.nonzero(np.abs(frame.astype(int) - colour).sum(-1) < 60)
        rows.append(ys.mean())
    return np.array(rows)


def test_ball_impact_sounds_and_lowest_frames_match_the_json(built):
    balls = [s for s in samples(folder(built, "av")) if s[2]["scene"] == "ball"]
    assert balls
    for media, caption, meta in balls:
        assert caption.endswith(f"ball bounces {times_word(meta['bounces'])}")
        clip = decode_mp4(media.read_bytes())
        onsets = energy_onsets(clip.audio, clip.sample_rate)
        assert len(onsets) == meta["bounces"] == len(meta["event_times"])
        assert np.abs(np.array(onsets) - meta["event_times"]).max() < 1 / clip.fps  # within a frame
        rows = ball_heights(clip.frames, meta["color_rgb"])
        for frame in meta["event_frames"]:
            window = rows[max(0, frame - 2) : frame + 3]
            assert rows[frame] == window.max()  # lowest point of the ball at the impact frame


def test_digit_appears_when_its_word_is_spoken(built):
    digits = [s for s in samples(folder(built, "av")) if s[2]["scene"] == "digit"]
    assert digits
    for media, caption, meta in digits:
        assert caption == f"the digit {meta['digit']} appears and is spoken"
        clip = decode_mp4(media.read_bytes())
        change = np.abs(np.diff(clip.frames.astype(int), axis=0)).max(axis=(1, 2, 3))  # [T - 1]
        assert int(np.argmax(change > 40)) + 1 == meta["event_frames"][0]
        onset = energy_onsets(clip.audio, clip.sample_rate, level=0.01)[0]
        assert abs(onset - meta["event_times"][0]) < 1 / clip.fps
        assert meta["speech_onset"] == pytest.approx(meta["event_times"][0])


def test_audio_flac_holds_the_word_at_its_onset(built):
    for media, caption, meta in samples(folder(built, "audio")):
        audio, rate = sf.read(media, dtype="float32")
        assert rate == 16_000 and audio.shape == (round(1.5 * rate),)
        assert caption == f"a voice says {meta['word']}"
        onset = energy_onsets(audio, rate, level=0.01)[0]
        assert abs(onset - meta["speech_onset"]) < 0.02
        assert meta["speech_onset"] < meta["speech_offset"] <= 1.5
