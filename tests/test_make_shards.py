"""tools/make_shards.py on real media: images (PIL), mp4 with and without audio (H.264 + AAC through
data.avio), wav / flac (soundfile), and a broken input of every kind.

The synthetic clips show a bright square moving two pixels per frame and a click every quarter
second, so that a cut clip can be checked against the time it was cut from.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from shard_helpers import manifest_of, samples_of, tar_bytes

from selfflow.configs import load_config
from selfflow.data.avio import decode_av, encode_mp4, probe
from selfflow.data.shards import sha256_file
from selfflow.tools import make_shards

REPO = Path(__file__).resolve().parents[1]
FPS, RATE, SIZE = 8, 16_000, 32
CLICK_EVERY = RATE // 4  # samples between clicks
BAD = {  # input file -> a phrase its skip reason must contain
    "bad_trunc.mp4": "cannot open media",
    "bad_corrupt.jpg": "cannot decode image",
    "bad_blank.png": "empty caption",
    "bad_nocap.wav": "missing caption",
    "bad_zero.wav": "audio has no samples",
    "bad_notes.xyz": "unknown file type",
}
COUNTS = {"image": 3, "video": 2, "audio": 2, "av": 3}  # stored as they are
SPEC_COUNTS = {"image": 3, "video": 3, "audio": 3, "av": 5}  # cut into the tiny preset's 1 s clips


def square_video(seconds: float, phase: int = 0) -> np.ndarray:
    """uint8 [T, 32, 32, 3]: a grey field with a red 8x8 square that moves 2 px right per frame."""
    frames = np.full((round(seconds * FPS), SIZE, SIZE, 3), 40, np.uint8)
    for i, frame in enumerate(frames):
        x = (2 * i + phase) % (SIZE - 8)
        frame[12:20, x : x + 8] = (230, 30, 30)
    return frames


def clicks(seconds: float, channels: int = 1) -> np.ndarray:
    """float32 [C, N]: a quiet hum plus a 5 ms click every quarter second."""
    n = round(seconds * RATE)
    wave = 0.02 * np.sin(np.arange(n) * 2 * np.pi * 220 / RATE)
    for start in range(0, n, CLICK_EVERY):
        wave[start : start + 80] = 0.6
    return np.repeat(wave[None].astype(np.float32), channels, 0)


def audio_file(wave: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave.T, RATE, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def image_file(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_inputs(folder: Path) -> Path:
    folder.mkdir(parents=True)
    media = {
        "img_a.png": image_file("PNG", (40, 48), 0),
        "img_b.jpg": image_file("JPEG", (32, 32), 1),
        "img_c.png": image_file("PNG", (24, 24), 2),
        "av_a.mp4": encode_mp4(square_video(2), FPS, clicks(2), RATE),
        "av_b.mp4": encode_mp4(square_video(3, phase=5), FPS, clicks(3), RATE),
        "av_short.mp4": encode_mp4(square_video(0.5), FPS, clicks(0.5), RATE),
        "vid_a.mp4": encode_mp4(square_video(2, phase=3), FPS),
        "vid_b.mp4": encode_mp4(square_video(1.5, phase=7), FPS),
        "snd_a.wav": audio_file(clicks(1.5), "WAV"),
        "snd_b.flac": audio_file(clicks(2.5, channels=2), "FLAC"),
    }
    jpeg = media["img_b.jpg"]
    media |= {
        "bad_trunc.mp4": media["av_a.mp4"][: len(media["av_a.mp4"]) // 2],
        "bad_corrupt.jpg": jpeg[:2] + bytes(100) + jpeg[102:],
        "bad_blank.png": media["img_a.png"],
        "bad_nocap.wav": media["snd_a.wav"],
        "bad_zero.wav": audio_file(np.zeros((1, 0), np.float32), "WAV"),
        "bad_notes.xyz": b"not media",
    }
    for name, data in media.items():
        (folder / name).write_bytes(data)
        if name not in ("bad_nocap.wav", "bad_notes.xyz"):
            caption = "  \n" if name == "bad_blank.png" else f"a caption for {name.split('.')[0]}\n"
            (folder / name).with_suffix(".txt").write_text(caption)
    (folder / "img_c.json").write_text(json.dumps({"label": 3, "source": "test"}))
    (folder / ".complete").touch()  # hidden files are not inputs (and not skips)
    return folder


def subset(inputs: Path, folder: Path, *names: str) -> Path:
    """A folder with copies of some inputs (and their captions, if any)."""
    folder.mkdir()
    for name in names:
        for path in (inputs / name, (inputs / name).with_suffix(".txt")):
            if path.is_file():
                shutil.copy(path, folder / path.name)
    return folder


def shard(source: Path, out: Path, *options: str) -> int:
    """make_shards in this process (quiet): its exit status."""
    return make_shards.main(["--input", str(source), "--output", str(out), "--quiet", *options])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/make_shards.py", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def skipped(out: Path) -> dict[str, str]:
    lines = (out / "skipped.jsonl").read_text().splitlines()
    return {Path(r["path"]).name: r["reason"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("media") / "in")


@pytest.fixture(scope="module")
def stored(inputs: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Shards of the original bytes, built by the command line as a user runs it."""
    out = tmp_path_factory.mktemp("stored") / "out"
    return out, run_cli("--input", str(inputs), "--output", str(out), "--shard-samples", "2", "--quiet")


SPEC_ARGS = ("--spec", "tiny", "--shard-samples", "2")


@pytest.fixture(scope="module")
def spec_out(inputs: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spec") / "out"
    assert shard(inputs, out, *SPEC_ARGS) == 0
    return out


# ---------------------------------------------------------------------- folder input, original bytes
def test_folder_gives_exact_counts_and_skips_exactly_the_bad_inputs(stored, inputs: Path):
    out, done = stored
    assert done.returncode == 0, done.stderr
    manifest = manifest_of(out)
    assert manifest["counts"] == COUNTS and manifest["skipped"] == len(BAD)
    assert f"skipped {len(BAD)}" in done.stdout and "3 av samples" in done.stdout
    reasons = skipped(out)
    assert reasons.keys() == BAD.keys()
    for name, phrase in BAD.items():
        assert phrase in reasons[name], (name, reasons[name])
    assert [s["samples"] for s in manifest["shards"]["image"]] == [2, 1]
    assert manifest["resolutions"]["image"] == {"24x24": 1, "32x32": 1, "40x48": 1}
    assert manifest["durations"]["av"]["total_s"] == pytest.approx(5.5, abs=0.05)
    for task, infos in manifest["shards"].items():
        assert [i["file"] for i in infos] == [f"{task}-{n:06d}.tar" for n in range(len(infos))]
        for info in infos:
            assert sha256_file(out / info["file"]) == info["sha256"]
            assert (out / info["file"]).stat().st_size == info["bytes"]


def test_stored_samples_keep_the_original_media(stored, inputs: Path):
    out, _ = stored
    images = {s["__key__"]: s for s in samples_of(out, "image")}
    assert list(images) == ["img_a", "img_b", "img_c"]
    assert images["img_b"]["jpg"] == (inputs / "img_b.jpg").read_bytes()
    assert images["img_a"]["png"] == (inputs / "img_a.png").read_bytes()
    assert json.loads(images["img_c"]["json"]) == {"label": 3, "source": "test"}
    assert images["img_a"]["txt"] == b"a caption for img_a"
    for task, has_audio in (("video", False), ("av", True)):
        for sample in samples_of(out, task):
            assert sample["mp4"] == (inputs / f"{sample['__key__']}.mp4").read_bytes()
            assert probe(sample["mp4"]).has_audio is has_audio
    audio = {s["__key__"]: s for s in samples_of(out, "audio")}
    assert set(audio) == {"snd_a", "snd_b"} and all(
        set(s) == {"__key__", "flac", "txt", "json"} for s in audio.values()
    )
    assert audio["snd_b"]["flac"] == (inputs / "snd_b.flac").read_bytes()
    wav, _ = soundfile.read(inputs / "snd_a.wav", dtype="int16")
    flac, rate = soundfile.read(io.BytesIO(audio["snd_a"]["flac"]), dtype="int16")
    assert rate == RATE and np.array_equal(flac, wav)  # wav -> flac is lossless


def test_no_audio_remuxes_av_files_into_video(inputs: Path, tmp_path):
    folder = subset(inputs, tmp_path / "in", "av_a.mp4", "vid_a.mp4")
    assert shard(folder, tmp_path / "o", "--no-audio") == 0
    manifest = manifest_of(tmp_path / "o")
    assert manifest["counts"] == {"video": 2}
    sample = samples_of(tmp_path / "o", "video")[0]
    assert sample["__key__"] == "av_a" and not probe(sample["mp4"]).has_audio
    spec = load_config("tiny").spec
    source = decode_av((inputs / "av_a.mp4").read_bytes(), spec, audio=False).video
    assert np.array_equal(decode_av(sample["mp4"], spec, audio=False).video, source)  # packets copied


# ---------------------------------------------------------------------- manifest inputs
def test_jsonl_and_csv_manifests(inputs: Path, tmp_path):
    subset(inputs, tmp_path / "media", "img_a.png", "snd_a.wav")
    image_row = {"path": "media/img_a.png", "caption": "a picture", "key": "pic.1", "meta": {"label": 1}}
    rows = [
        {**image_row, "split": "dev"},  # a key with a dot, metadata from `meta` and an extra column
        {"path": str(inputs / "vid_b.mp4"), "caption": "a video"},  # absolute
        {"path": "media/snd_a.wav", "caption": "clicks"},
        {"path": "media/gone.png", "caption": "missing file"},
        {"path": "media/img_a.png", "caption": ""},
    ]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shard(jsonl, tmp_path / "j") == 0
    manifest = manifest_of(tmp_path / "j")
    assert manifest["counts"] == {"image": 1, "video": 1, "audio": 1}
    image = samples_of(tmp_path / "j", "image")[0]
    assert image["__key__"] == "pic_1" and image["txt"] == b"a picture"
    assert json.loads(image["json"]) == {"label": 1, "split": "dev"}
    assert samples_of(tmp_path / "j", "video")[0]["__key__"] == "vid_b"
    reasons = list(map(json.loads, (tmp_path / "j" / "skipped.jsonl").read_text().splitlines()))
    assert [(Path(r["path"]).name, r["reason"]) for r in reasons] == [
        ("gone.png", f"list.jsonl:4: media file {tmp_path / 'media' / 'gone.png'} not found"),
        ("img_a.png", "list.jsonl:5: empty caption"),
    ]

    csv = tmp_path / "list.csv"
    csv.write_text('path,caption,key,label\nmedia/img_a.png,"red, green",,7\nmedia/notes.txt,text,,\n')
    assert shard(csv, tmp_path / "c") == 0
    image = samples_of(tmp_path / "c", "image")[0]
    assert (image["__key__"], image["txt"], json.loads(image["json"])) == (
        "img_a",
        b"red, green",
        {"label": "7"},
    )
    assert skipped(tmp_path / "c") == {"notes.txt": "list.csv:3: unknown file type '.txt'"}


# ---------------------------------------------------------------------- re-encoding to a clip spec
def test_spec_reencodes_to_the_spec_shape_and_cuts_long_inputs(spec_out: Path):
    spec = load_config("tiny").spec
    manifest = manifest_of(spec_out)
    assert manifest["counts"] == SPEC_COUNTS
    assert manifest["spec"]["fps"] == spec.fps and manifest["spec"]["preset"] == "tiny"
    assert "shorter than the clip duration" in skipped(spec_out)["av_short.mp4"]
    keys = {task: [s["__key__"] for s in samples_of(spec_out, task)] for task in SPEC_COUNTS}
    assert keys["av"] == ["av_a_c000", "av_a_c001", "av_b_c000", "av_b_c001", "av_b_c002"]
    assert keys["video"] == ["vid_a_c000", "vid_a_c001", "vid_b_c000"]
    assert keys["audio"] == ["snd_a_c000", "snd_b_c000", "snd_b_c001"]
    for sample in samples_of(spec_out, "av"):
        clip = decode_av(sample["mp4"], spec)
        assert clip.video.shape == (spec.num_frames, spec.height, spec.width, 3)
        assert clip.audio.shape == (spec.audio_channels, spec.num_samples)
    for sample in samples_of(spec_out, "video"):
        assert not probe(sample["mp4"]).has_audio
        assert decode_av(sample["mp4"], spec, audio=False).video.shape == (spec.num_frames, 32, 32, 3)
    for sample in samples_of(spec_out, "audio"):
        info = soundfile.info(io.BytesIO(sample["flac"]))
        assert (info.channels, info.frames, info.samplerate) == (1, spec.num_samples, spec.sample_rate)
    for sample in samples_of(spec_out, "image"):
        assert Image.open(io.BytesIO(sample["png"])).size == (spec.image_width, spec.image_height)


def test_cut_clips_hold_the_media_of_their_time_window(spec_out: Path, inputs: Path):
    """Clip k of av_b shows the square where the source shows it at k seconds, and its clicks."""
    spec = load_config("tiny").spec
    source = (inputs / "av_b.mp4").read_bytes()
    for k, sample in enumerate(samples_of(spec_out, "av")[2:]):
        meta = json.loads(sample["json"])
        assert meta["clip"] == {"source": "av_b", "index": k, "start": float(k)}
        clip, original = decode_av(sample["mp4"], spec), decode_av(source, spec, start=float(k))
        error = np.abs(clip.video.astype(int) - original.video).mean()
        assert error < 1.5  # H.264 at crf 18; one frame off gives 4.5
        red = clip.video[:, 12:20, :, 0].mean(axis=1) > 135  # [T, W]: columns the square covers
        assert [int(np.argmax(row)) for row in red] == [(2 * (8 * k + i) + 5) % 24 for i in range(8)]
        quarters = np.abs(clip.audio[0]).reshape(4, CLICK_EVERY)
        assert np.argmax(quarters, axis=1).max() < 80  # each click still opens its quarter second


def test_workers_give_identical_shards(inputs: Path, spec_out: Path, tmp_path):
    out = tmp_path / "w2"
    assert shard(inputs, out, *SPEC_ARGS, "--workers", "2") == 0
    assert tar_bytes(out) == tar_bytes(spec_out) and len(tar_bytes(out)) == 9
    assert manifest_of(out)["shards"] == manifest_of(spec_out)["shards"]


# ---------------------------------------------------------------------- resuming and verifying
def stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def test_interrupted_run_resumes_to_identical_shards(inputs: Path, spec_out: Path, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(spec_out, out)
    argv = ["--input", str(inputs), "--output", str(out), "--quiet", *SPEC_ARGS]
    before = stamps(out)
    assert make_shards.main(argv) == 0  # a finished run: nothing to redo
    assert stamps(out) == before and "9 shard(s) kept" in capsys.readouterr().out

    (out / "av-000002.tar").unlink()  # the last av shard never got written
    image = bytearray((out / "image-000000.tar").read_bytes())
    image[700] ^= 0xFF  # a damaged shard before a good one of its set
    (out / "image-000000.tar").write_bytes(bytes(image))
    log = (out / "progress.jsonl").read_text()
    cut = log.index('"shard": "audio", "index": 1')
    (out / "progress.jsonl").write_text(log[:cut])  # the log was torn mid-line when the run died
    (out / "manifest.json").unlink()
    redo = ("image-000000.tar", "audio-000001.tar")
    untouched = {name: stamp for name, stamp in stamps(out).items() if name not in redo}

    assert make_shards.main(argv) == 0
    assert tar_bytes(out) == tar_bytes(spec_out)
    assert {name: stamps(out)[name] for name in untouched} == untouched  # good shards are not rewritten
    assert "6 shard(s) kept" in capsys.readouterr().out
    assert manifest_of(out)["shards"] == manifest_of(spec_out)["shards"]


def test_killed_run_resumes_to_identical_shards(inputs: Path, tmp_path):
    args = ["--input", str(inputs), "--size", "32x32", "--video-size", "32x32", "--fps", "8"]
    args += ["--duration", "0.25", "--sample-rate", "16000", "--shard-samples", "1", "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "tools/make_shards.py", *args, "--output", str(out)], cwd=REPO)
    log = out / "progress.jsonl"
    deadline = time.monotonic() + 60
    while not (log.is_file() and '"shard"' in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # it died before the end
    assert make_shards.main([*args, "--output", str(out)]) == 0
    assert make_shards.main([*args, "--output", str(tmp_path / "whole")]) == 0
    assert tar_bytes(out) == tar_bytes(tmp_path / "whole") and len(tar_bytes(out)) > 40
    assert not list(out.glob("*.tmp"))


def test_verify_catches_a_modified_shard(spec_out: Path, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(spec_out, out)
    assert make_shards.main(["--output", str(out), "--verify"]) == 0
    data = bytearray((out / "video-000001.tar").read_bytes())
    data[2000] ^= 0x01  # one bit of the first mp4 (after the json and mp4 headers)
    (out / "video-000001.tar").write_bytes(bytes(data))
    assert make_shards.main(["--output", str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "video-000001.tar: sha256 differs from the manifest" in err and "video-000000" not in err


# ---------------------------------------------------------------------- usage errors
def test_bad_paths_and_options_fail_with_one_line(inputs: Path, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    cases = {
        "does not exist": ("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")),
        "cannot write": ("--input", str(inputs), "--output", str(blocked / "o")),
        "unrecognized arguments": ("--input", str(inputs), "--output", str(tmp_path / "o"), "--colour"),
        "must be even": ("--input", str(inputs), "--output", str(tmp_path / "o"), "--video-size", "31x32"),
    }
    for words, args in cases.items():
        done = run_cli(*args)
        assert done.returncode != 0 and words in done.stderr, (words, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- codec latents
LATENT_YAML = """name: latents
spec: {duration: 0.5, fps: 8, height: 16, width: 16, sample_rate: 16000, image_height: 16, image_width: 16,
       image_latent_channels: 4, video_latent_channels: 4, audio_latent_channels: 4, space_stride: 2,
       audio_stride: 8, image_patch: 4, video_patch: [1, 4, 4], audio_patch: 40}
"""


def test_latents_are_the_codec_encoding_of_what_training_decodes(inputs: Path, tmp_path):
    import diffusers
    import torch

    from selfflow.data.streams import decode_sample
    from selfflow.tokenizers.codecs import DiffusersAutoencoder

    torch.manual_seed(0)
    kw = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    down, up = ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2
    diffusers.AutoencoderKL(down_block_types=down, up_block_types=up, **kw).save_pretrained(tmp_path / "kl")
    diffusers.AutoencoderOobleck(
        encoder_hidden_size=8,
        downsampling_ratios=[2, 4],
        channel_multiples=[1, 2],
        decoder_channels=8,
        decoder_input_channels=4,
        audio_channels=1,
    ).save_pretrained(tmp_path / "oobleck")
    (tmp_path / "latents.yaml").write_text(LATENT_YAML)
    folder = subset(inputs, tmp_path / "in", "img_a.png", "av_a.mp4", "snd_a.wav")
    out, codec_dirs = (
        tmp_path / "out",
        ("--latents", str(tmp_path / "kl"), "--latents", str(tmp_path / "oobleck")),
    )
    assert shard(folder, out, "--spec", str(tmp_path / "latents.yaml"), *codec_dirs) == 0
    assert manifest_of(out)["counts"] == {"image": 1, "audio": 3, "av": 4}

    spec = load_config(tmp_path / "latents.yaml").spec
    codecs = {m: DiffusersAutoencoder(tmp_path / "kl", m) for m in ("image", "video")}
    codecs["audio"] = DiffusersAutoencoder(tmp_path / "oobleck", "audio")
    fields = {"image": "latent.npy", "video": "video_latent.npy", "audio": "audio_latent.npy"}
    shapes = {"image": (4, 8, 8), "video": (4, 4, 8, 8), "audio": (4, 1000)}  # strides 2, 2, 8
    for task, modalities in (("image", ["image"]), ("audio", ["audio"]), ("av", ["video", "audio"])):
        sample = samples_of(out, task)[-1]
        assert sorted(f for f in sample if f.endswith(".npy")) == sorted(fields[m] for m in modalities)
        media = decode_sample(sample, task, spec).media  # what the training pipeline decodes
        for modality in modalities:
            stored = np.load(io.BytesIO(sample[fields[modality]]))
            assert stored.shape == shapes[modality] and stored.dtype == np.float32
            expected = codecs[modality].encode(torch.from_numpy(media[modality])[None])[0]
            np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5)

    done = run_cli("--input", str(folder), "--output", str(tmp_path / "x"), "--latents", str(tmp_path / "kl"))
    assert done.returncode == 2 and "--latents needs --spec" in done.stderr
