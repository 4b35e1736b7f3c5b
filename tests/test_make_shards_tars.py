"""tools/make_shards.py on existing WebDataset shards, written by webdataset's own TarWriter in the
shapes img2dataset and video2dataset produce: paths, brace patterns, folders of tars and `pipe:`
commands, re-sharded through the same validation as a media folder (data/tarinputs.py)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset
from conftest import av_clip
from hostile_media import m4a, png, wav, webm
from PIL import Image
from shard_helpers import manifest_of, samples_of, tar_bytes

from selfflow.configs import load_config
from selfflow.data.avio import decode_av, probe
from selfflow.data.pipeline import DataPipeline
from selfflow.tools import make_shards

REPO = Path(__file__).resolve().parents[1]
SPEC = load_config("tiny").spec
NOT_WEBM = (
    "cannot open media as matroska: [Errno 1094995529] Invalid data found when processing input: '<none>'"
)
FAILED_COMMAND = "cannot read shard: the command exited with status 1"


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def mp3() -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, 0.3 * np.sin(np.arange(16_000) * 0.05).astype(np.float32), 16_000, format="MP3")
    return buf.getvalue()


def write_tars(folder: Path, shards: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, samples in shards.items():
        with webdataset.TarWriter(str(folder / name)) as writer:
            for sample in samples:
                writer.write(sample)
    return folder


def laion_like(i: int, caption: str | None = "", **fields) -> dict:
    """An img2dataset sample: `jpg`, `txt` (unless caption is None) and a `json` of download facts."""
    sample = {"__key__": f"{i:09d}", "jpg": jpeg(i)}
    if caption is not None:
        sample["txt"] = caption or f"photo number {i}"
    sample["json"] = json.dumps({"url": f"http://example.com/{i}.jpg", "status": "success", "width": 24})
    return sample | fields


def image_corpus(folder: Path) -> Path:
    """3 img2dataset shards: 5 good samples (one keyed with a folder prefix, one captioned only in its
    json) and 5 bad ones."""
    corrupt = jpeg(3)[:2] + bytes(100) + jpeg(3)[102:]
    caption_in_json = json.dumps({"caption": "caption from json", "status": "ok"})
    prefixed = {"__key__": "00000/000000002", "png": png(2), "txt": "green"}  # a key with a folder
    return write_tars(
        folder,
        {
            "00000.tar": [laion_like(0), laion_like(1), prefixed],
            "00001.tar": [
                laion_like(3, jpg=corrupt),
                laion_like(4, caption=None, json=caption_in_json),
                laion_like(5, caption=None),  # no caption anywhere
            ],
            "00002.tar": [
                laion_like(0, "the same key again"),
                {"__key__": "000000007", "webm": b"\x1aE\xdf\xa3 not really", "txt": "a webm clip"},
                laion_like(8),
                {"__key__": "x" * 250, "jpg": jpeg(9), "txt": "a key too long for a file name"},
            ],
        },
    )  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/make_shards.py", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def skipped(out: Path) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return image_corpus(tmp_path_factory.mktemp("laion") / "shards")


IMAGE_ARGS = ("--shard-samples", "2", "--quiet")


@pytest.fixture(scope="module")
def image_out(corpus: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("out") / "laion"
    return out, run_cli("--input", f"{corpus}/{{00000..00002}}.tar", "--output", str(out), *IMAGE_ARGS)


# ---------------------------------------------------------------------- img2dataset shards
def test_brace_pattern_of_image_shards_is_resharded_validated(image_out, corpus: Path):
    out, done = image_out
    assert done.returncode == 0, done.stderr
    assert "wrote 5 image samples in 3 shard(s)" in done.stdout and "skipped 5" in done.stdout
    manifest = manifest_of(out)
    assert manifest["counts"] == {"image": 5} and manifest["skipped"] == 5
    assert [s["samples"] for s in manifest["shards"]["image"]] == [2, 2, 1]
    reasons = skipped(out)
    assert reasons.pop(f"{corpus}/00001.tar:000000003").startswith("cannot decode image: ")
    assert reasons.pop(f"{corpus}/00002.tar:000000007").startswith("cannot open media as matroska: ")
    assert reasons == {
        f"{corpus}/00001.tar:000000005": "missing or empty caption (no txt, caption or json 'caption')",
        f"{corpus}/00002.tar:000000000": f"key '000000000' is already taken by {corpus}/00000.tar:000000000",
        f"{corpus}/00002.tar:{'x' * 250}": "key is longer than 200 characters",
    }
    samples = {s["__key__"]: s for s in samples_of(out, "image")}
    assert list(samples) == ["000000000", "000000001", "000000004", "000000008", "00000_000000002"]
    assert samples["000000001"]["jpg"] == jpeg(1) and samples["00000_000000002"]["png"] == png(2)
    assert samples["000000001"]["txt"] == b"photo number 1"
    assert json.loads(samples["000000001"]["json"])["url"] == "http://example.com/1.jpg"
    assert samples["000000004"]["txt"] == b"caption from json"
    assert json.loads(samples["000000004"]["json"]) == {"caption": "caption from json", "status": "ok"}
    assert not (out / ".staging").exists()  # the unpacked copy is removed


def test_training_reader_reads_the_resharded_images(image_out):
    out, _ = image_out
    pipe = DataPipeline(out, SPEC, seed=0, batch_size=5, shuffle_buffer=0)
    batch = next(pipe)
    assert batch.task == "image" and batch.media["image"].shape == (5, 3, 32, 32)
    assert sorted(batch.captions) == sorted(
        ["photo number 0", "photo number 1", "caption from json", "photo number 8", "green"]
    )
    assert pipe.skipped_count == 0


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def test_rerun_rewrites_nothing_and_workers_give_identical_shards(image_out, corpus: Path, tmp_path, capsys):
    out, _ = image_out
    before, data, manifest = stamps(out), tar_bytes(out), (out / "manifest.json").read_text()
    args = ["--input", f"{corpus}/{{00000..00002}}.tar", *IMAGE_ARGS]
    assert make_shards.main([*args, "--output", str(out)]) == 0
    assert "3 shard(s) kept" in capsys.readouterr().out
    assert stamps(out) == before and tar_bytes(out) == data
    assert (out / "manifest.json").read_text() == manifest and not (out / ".staging").exists()

    resumed = tmp_path / "resumed"  # moved, and died before its second shard and the manifest
    shutil.copytree(out, resumed)
    (resumed / "image-000001.tar").unlink()
    (resumed / "manifest.json").unlink()
    kept = stamps(resumed)
    assert make_shards.main([*args, "--output", str(resumed)]) == 0
    assert "2 shard(s) kept" in capsys.readouterr().out and tar_bytes(resumed) == data
    assert {name: stamps(resumed)[name] for name in kept} == kept

    assert make_shards.main([*args, "--output", str(tmp_path / "w2"), "--workers", "2"]) == 0
    assert tar_bytes(tmp_path / "w2") == data and len(data) == 3
    assert skipped(tmp_path / "w2") == skipped(out)


# ---------------------------------------------------------------------- sources
def truncated_shard(path: Path) -> None:
    """3 good samples, the tar cut in the middle of the last one's jpg."""
    write_tars(path.parent, {path.name: [laion_like(20 + i) for i in range(3)]})
    with tarfile.open(path) as tar:
        last = tar.getmember("000000022.jpg")
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])


def test_folder_of_tars_and_pipe_commands_list_unreadable_shards(corpus: Path, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(corpus / "00000.tar", folder / "00000.tar")
    truncated_shard(folder / "00001.tar")
    assert make_shards.main(["--input", str(folder), "--output", str(tmp_path / "f"), "--quiet"]) == 0
    assert [s["__key__"] for s in samples_of(tmp_path / "f", "image")] == [
        "000000000",
        "000000001",
        "000000020",
        "000000021",
        "00000_000000002",
    ]  # fmt: skip  (the samples before the cut jpg are whole)
    reasons = skipped(tmp_path / "f")
    assert reasons.keys() == {f"{folder}/00001.tar"}
    assert reasons[f"{folder}/00001.tar"].startswith("cannot read shard: ")

    source = f"pipe:{{false,cat {corpus}/00000.tar,cat {corpus}/00001.tar}}"
    done = run_cli("--input", source, "--output", str(tmp_path / "p"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert manifest_of(tmp_path / "p")["counts"] == {"image": 4}
    reasons = skipped(tmp_path / "p")
    assert reasons["pipe:false"] == FAILED_COMMAND
    assert reasons[f"pipe:cat {corpus}/00001.tar:000000003"].startswith("cannot decode image")
    keys = [s["__key__"] for s in samples_of(tmp_path / "p", "image")]
    assert keys == ["000000000", "000000001", "000000004", "00000_000000002"]


def test_bad_tar_inputs_fail_with_one_line_and_write_nothing(corpus: Path, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(corpus / "00000.tar", mixed / "00000.tar")
    (mixed / "x.png").write_bytes(png(0))
    cases = {
        "no shards match": (f"{corpus}/*.none.tar", tmp_path / "o"),
        "holds both .tar shards and media files": (str(mixed), tmp_path / "o"),
        "must not be the folder of the input shard": (f"{corpus}/*.tar", corpus),
    }
    for words, (source, out) in cases.items():
        done = run_cli("--input", source, "--output", str(out), "--quiet")
        assert done.returncode == 1 and words in done.stderr, (words, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists() and sorted(p.name for p in corpus.iterdir()) == [
        "00000.tar", "00001.tar", "00002.tar",
    ]  # fmt: skip
    done = run_cli("--input", "pipe:false", "--output", str(tmp_path / "none"), "--quiet")
    assert done.returncode == 1 and "no valid samples" in done.stderr
    assert skipped(tmp_path / "none").keys() == {"pipe:false"}


# ---------------------------------------------------------------------- video2dataset and audio shards
def test_video_shards_with_and_without_audio_are_cut_to_the_spec(tmp_path):
    meta = {"url": "http://example.com/v.mp4", "duration": 1.0}
    shards = write_tars(
        tmp_path / "v2d",
        {
            "00000.tar": [
                {"__key__": "v0", "mp4": av_clip(0), "txt": "a square and a click", "json": json.dumps(meta)},
                {"__key__": "v1", "mp4": av_clip(1, with_audio=False), "txt": "a silent square"},
                {"__key__": "v2", "mp4": av_clip(2)[:900], "txt": "cut short"},
            ],
            "00001.tar": [{"__key__": "v3", "mp4": av_clip(3), "json": json.dumps({"caption": "from json"})}],
        },
    )
    out = tmp_path / "out"
    done = run_cli("--input", f"{shards}/*.tar", "--output", str(out), "--spec", "tiny", "--quiet")
    assert done.returncode == 0, done.stderr
    assert manifest_of(out)["counts"] == {"video": 1, "av": 2}
    assert skipped(out).keys() == {f"{shards}/00000.tar:v2"}
    av = samples_of(out, "av")
    assert [s["__key__"] for s in av] == ["v0_c000", "v3_c000"] and av[1]["txt"] == b"from json"
    assert json.loads(av[0]["json"]) == {**meta, "clip": {"source": "v0", "index": 0, "start": 0.0}}
    for sample in av:
        clip = decode_av(sample["mp4"], SPEC)
        assert clip.video.shape == (SPEC.num_frames, 32, 32, 3) and clip.audio.shape == (1, SPEC.num_samples)
    (video,) = samples_of(out, "video")
    assert video["__key__"] == "v1_c000" and not probe(video["mp4"]).has_audio
    assert decode_av(video["mp4"], SPEC, audio=False).video.shape == (SPEC.num_frames, 32, 32, 3)


def test_webm_clips_are_kept_in_their_container_or_re_encoded_to_mp4(tmp_path):
    clip = webm(2.0)
    shards = write_tars(tmp_path / "webm", {"00000.tar": [{"__key__": "w0", "webm": clip, "txt": "light"}]})
    kept, spec_out = tmp_path / "kept", tmp_path / "spec"
    assert run_cli("--input", str(shards), "--output", str(kept), "--quiet").returncode == 0
    (sample,) = samples_of(kept, "video")
    assert sample["webm"] == clip and "mp4" not in sample  # the original VP9 bytes, in their field
    pipe = DataPipeline(kept, SPEC, batch_size=1, shuffle_buffer=0)  # the reader opens the webm field
    assert pipe.tasks == ["video"] and next(pipe).media["video"].shape == (1, 3, SPEC.num_frames, 32, 32)
    done = run_cli("--input", str(shards), "--output", str(spec_out), "--spec", "tiny", "--quiet")
    assert done.returncode == 0, done.stderr
    clips = samples_of(spec_out, "video")
    assert [c["__key__"] for c in clips] == ["w0_c000", "w0_c001"]
    assert decode_av(clips[1]["mp4"], SPEC, audio=False).video.shape == (SPEC.num_frames, 32, 32, 3)


def test_audio_shards_take_what_soundfile_decodes_within_the_limits(tmp_path):
    shards = write_tars(
        tmp_path / "audio",
        {
            "00000.tar": [
                {"__key__": "a_wav", "wav": wav(16_000), "txt": "silence"},
                {"__key__": "b_mp3", "mp3": mp3(), "txt": "a tone"},
                {"__key__": "c_m4a", "m4a": b"\0\0\0 ftypM4A ", "txt": "aac"},
                {"__key__": "d_m4a", "m4a": m4a(1.5, 22_050), "txt": "an aac tone"},
            ]
        },
    )
    assert (
        make_shards.main(["--input", str(shards / "00000.tar"), "--output", str(tmp_path / "d"), "--quiet"])
        == 0
    )
    audio = {s["__key__"]: s for s in samples_of(tmp_path / "d", "audio")}
    assert list(audio) == ["a_wav", "b_mp3", "d_m4a"]  # MP3 and OGG are in data.limits.audio_formats
    assert skipped(tmp_path / "d")[f"{shards}/00000.tar:c_m4a"].startswith("cannot open media as mp4")
    m4a_info = soundfile.info(io.BytesIO(audio["d_m4a"]["flac"]))  # decoded by PyAV, kept as flac
    assert m4a_info.samplerate == 22_050 and abs(m4a_info.duration - 1.5) < 0.1
    argv = ["--input", str(shards / "00000.tar"), "--output", str(tmp_path / "m"), "--quiet"]
    assert make_shards.main([*argv, "--limit", "audio_formats=WAV,FLAC"]) == 0
    assert [s["__key__"] for s in samples_of(tmp_path / "m", "audio")] == ["a_wav", "d_m4a"]  # not sndfile
    assert (
        skipped(tmp_path / "m")[f"{shards}/00000.tar:b_mp3"] == "audio format MP3 is not allowed (WAV/FLAC)"
    )
    info = soundfile.info(io.BytesIO(audio["b_mp3"]["flac"]))  # stored as flac, like a wav
    assert info.format == "FLAC" and info.samplerate == 16_000 and abs(info.duration - 1.0) < 0.1
