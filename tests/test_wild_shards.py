"""Shards people already have: img2dataset- and video2dataset-shaped tars written with webdataset's own
TarWriter, named by brace patterns, globs, folders and `pipe:` commands; the task of each sample inferred
from its fields, the caption from txt / json; clips of any fps, size and length cut to the spec (a
seeded random window when longer); splitting, shuffling and exact resume for these sources; a command
that fails is retried, then counted and skipped with its URL."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds
from hostile_media import m4a, png, webm
from PIL import Image

from selfflow.configs import load_config
from selfflow.data.avio import encode_mp4
from selfflow.data.pipeline import DataError, DataPipeline, WorkerPipeline, available_tasks
from selfflow.data.streams import TaskStream
from selfflow.training.tracking import read_metrics

SPEC = load_config("tiny").spec  # 1 s, 8 fps, 32x32, 16 kHz mono
ROOT = Path(__file__).resolve().parents[1]


def jpeg(i: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (37 * i % 256, 90, 200 - 11 * i % 200)).save(buf, format="JPEG")
    return buf.getvalue()


def img2dataset_shards(folder: Path, shards: int = 4, per_shard: int = 6) -> Path:
    """`{00000..}.tar` as img2dataset writes them: `<shard><index>.jpg` + `.txt` + `.json`, images of
    any size and aspect ratio; sample 3 of each shard is captioned only in its json, 5 is a broken jpeg."""
    folder.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key, size = f"{s:05d}{i:04d}", (48 + 8 * i, 32 + 5 * s)
                meta = {"url": f"http://example.com/{key}.jpg", "caption": f"a photo number {i}",
                        "width": size[0], "height": size[1], "key": key, "status": "success"}  # fmt: skip
                sample = {"__key__": key, "jpg": jpeg(i, size), "json": json.dumps(meta).encode()}
                if i != 3:
                    sample["txt"] = f"a photo number {i}".encode()
                if i == 5:
                    sample["jpg"] = sample["jpg"][:100]
                sink.write(sample)
    return folder


def flash_clip(seconds: float, fps: int, size: tuple[int, int], flash: float, audio: bool) -> bytes:
    """A clip with one white frame at `flash` seconds (and a click there when it has sound)."""
    t = int(seconds * fps)
    video = np.zeros((t, size[0], size[1], 3), np.uint8)
    video[round(flash * fps), :, :] = 255
    sound = np.zeros((1, int(seconds * 16_000)), np.float32)
    sound[0, round(flash * 16_000) : round(flash * 16_000) + 160] = 0.8
    return encode_mp4(video, fps, sound if audio else None, 16_000)


def sound(fmt: str, seconds: float = 1.5, rate: int = 44_100, channels: int = 2) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.full((int(seconds * rate), channels), 0.1, np.float32), rate, format=fmt)
    return buf.getvalue()


def mixed_corpus(folder: Path, shards: int = 2) -> Path:
    """video2dataset-like tars that also hold images and audio: mp4 clips with and without sound at 12
    and 24 fps, 2-3 s long (the spec wants 1 s), 48x64 and 40x40, and a VP9 webm; mp3 / m4a / flac / ogg
    audio; webp images; a sample without media."""
    folder.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(4):
                fps, size = (12, (48, 64)) if i % 2 else (24, (40, 40))
                clip = flash_clip(2.0 + i % 2, fps, size, flash=0.5 + i * 0.4, audio=i < 2)
                sink.write({"__key__": f"clip_{s}_{i}", "mp4": clip, "txt": b"a white flash",
                            "json": json.dumps({"fps": fps}).encode()})  # fmt: skip
            sink.write({"__key__": f"clip_{s}_webm", "webm": webm(2.0), "txt": b"a brightening square"})
            audio = {"mp3": sound("MP3"), "m4a": m4a(2.0), "flac": sound("FLAC", 1.0, 16_000, 1)}
            audio |= {"ogg": sound("OGG", 2.0, 48_000)}
            for name, data in audio.items():
                sink.write({"__key__": f"sound_{s}_{name}", name: data, "txt": f"a {name} tone".encode()})
            for i in range(3):
                sink.write({"__key__": f"image_{s}_{i}", "webp": _webp(i), "txt": b"a square"})
            sink.write({"__key__": f"nothing_{s}", "cls": b"3", "txt": b"no media at all"})
    return folder


def _webp(i: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(i))).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


# ---------------------------------------------------------------------- sources
def test_every_kind_of_source_names_the_same_shards(tmp_path):
    folder = img2dataset_shards(tmp_path / "laion")
    pattern, files = str(folder / "{00000..00003}.tar"), sorted(str(p) for p in folder.glob("*.tar"))
    for source in (pattern, str(folder / "*.tar"), str(folder), ",".join(files)):
        pipe = DataPipeline(source, SPEC, batch_size=4, shuffle_buffer=0)
        assert pipe.tasks == ["image"] and pipe.streams["image"].shards == files, source
    piped = DataPipeline(f"pipe:cat {pattern}", SPEC, batch_size=4, shuffle_buffer=0)
    assert piped.streams["image"].shards == [f"pipe:cat {f}" for f in files]
    keys = [k for _ in range(4) for k in next(piped).keys]
    good = {f"{s:05d}{i:04d}" for s in range(4) for i in range(6) if i != 5}  # 5 is broken
    assert len(set(keys)) == 16 and set(keys) <= good
    typed = DataPipeline("", SPEC, batch_size=2, task_shards={"image": pattern}, shuffle_buffer=0)
    assert typed.streams["image"].mixed == frozenset() and len(next(typed).keys) == 2


def test_img2dataset_shards_train_from_a_brace_pattern(tmp_path):
    """The issue's command: main.py on img2dataset-style shards named by a brace pattern."""
    folder = img2dataset_shards(tmp_path / "laion")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "training/main.py", "--config", "configs/tiny.yaml", "--no-progress",
         f"data.shards={folder}/{{00000..00003}}.tar", f"run.dir={run}", "train.max_steps=5",
         "train.batch_size=4", "train.log_every=1", "sample.num=1", "sample.steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and steps[-1]["samples_seen_image"] == 20
    skipped = [r for r in rows if r.get("event") == "skipped_sample"]
    assert skipped and all(r["sample"].endswith("0005") and "image" in r["reason"] for r in skipped)


# ---------------------------------------------------------------------- tasks inferred per sample
def test_a_mixed_tar_feeds_every_task_with_spec_shaped_media(tmp_path):
    folder = mixed_corpus(tmp_path / "mixed")
    assert available_tasks(str(folder)) == ["image", "video", "audio", "av"]
    weights = {"image": 1, "video": 1, "audio": 1, "av": 1}
    pipe = DataPipeline(str(folder), SPEC, seed=3, weights=weights, batch_size=2, shuffle_buffer=4)
    seen: dict[str, set[str]] = {t: set() for t in weights}
    for _ in range(48):
        batch = next(pipe)
        seen[batch.task] |= set(batch.keys)
        shapes = {m: tuple(x.shape[1:]) for m, x in batch.media.items()}
        expected = {"image": {"image": (3, 32, 32)}, "video": {"video": (3, 8, 32, 32)},
                    "audio": {"audio": (1, 16_000)},
                    "av": {"video": (3, 8, 32, 32), "audio": (1, 16_000)}}[batch.task]  # fmt: skip
        assert shapes == expected, batch.task
    assert seen["av"] == {f"clip_{s}_{i}" for s in range(2) for i in (0, 1)}
    assert seen["video"] == {f"clip_{s}_{i}" for s in range(2) for i in (2, 3, "webm")}
    assert seen["audio"] == {f"sound_{s}_{n}" for s in range(2) for n in ("mp3", "m4a", "flac", "ogg")}
    assert seen["image"] == {f"image_{s}_{i}" for s in range(2) for i in range(3)}
    counted = [s for s in pipe.streams.values() if s.skipped]
    assert len(counted) == 1 and set(counted[0].skipped) == {  # once, by one stream, per epoch read
        f"{folder}/{s:05d}.tar:nothing_{s}" for s in range(2)
    }


def test_longer_clips_give_seeded_random_windows_that_resume_exactly(tmp_path):
    folder = mixed_corpus(tmp_path / "mixed", shards=2)
    kwargs = dict(seed=1, weights={"av": 1, "video": 1}, batch_size=2, shuffle_buffer=3)
    straight = DataPipeline(str(folder), SPEC, **kwargs)
    batches = [next(straight) for _ in range(8)]
    flashes = [int(np.argmax(v.mean(axis=(0, 2, 3)))) for b in batches for v in b.media["video"].numpy()]
    assert len(set(flashes)) > 2  # the white frame lands at different places: windows differ
    first = DataPipeline(str(folder), SPEC, **kwargs)
    for _ in range(3):
        next(first)
    resumed = DataPipeline(str(folder), SPEC, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for want in batches[3:]:
        got = next(resumed)
        assert got.keys == want.keys and all(torch_equal(got.media[m], want.media[m]) for m in want.media)
    start = DataPipeline(str(folder), SPEC, **kwargs, clip_window="start")
    batches = [next(start) for _ in range(8)]
    frames = {
        k: int(np.argmax(v.numpy().mean(axis=(0, 2, 3))))
        for b in batches
        for k, v in zip(b.keys, b.media["video"], strict=True)
        if k.endswith("_0")
    }
    assert frames and set(frames.values()) == {4}  # the first second, whose flash is at 0.5 s


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_pipe_sources_split_over_ranks_and_resume_exactly_over_workers(tmp_path):
    folder = img2dataset_shards(tmp_path / "laion", shards=4)
    source = f"pipe:cat {folder}/{{00000..00003}}.tar"
    ranks = [DataPipeline(source, SPEC, batch_size=2, rank=r, world=2, shuffle_buffer=0) for r in range(2)]
    mine = [set(p.streams["image"]._my_shards(0)) for p in ranks]
    assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == 4
    kwargs = dict(shards=source, spec=SPEC, batch_size=2, seed=2, shuffle_buffer=4)
    straight = WorkerPipeline(kwargs, 2)
    keys = [next(straight).keys for _ in range(6)]
    first = WorkerPipeline(kwargs, 2)
    got = [next(first).keys for _ in range(3)]
    resumed = WorkerPipeline(kwargs, 2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [next(resumed).keys for _ in range(3)]
    assert got == keys


def test_a_failing_command_is_retried_then_counted_with_its_url(tmp_path):
    folder = img2dataset_shards(tmp_path / "laion", shards=1)
    tries = tmp_path / "tries"
    bad = f"pipe:echo x >> {tries}; exit 7"
    alone = TaskStream("image", [bad], SPEC, shuffle_buffer=0, open_retries=2, retry_wait_s=0.01)
    with pytest.raises(DataError, match="a whole epoch of .* without a good image sample"):
        next(alone)
    assert tries.read_text().count("x") == 3  # one try and two retries
    why = "unreadable shard from here on (after 3 attempts): the command exited with status 7"
    assert alone.skipped == {f"{bad}:*": why}
    pipe = DataPipeline(f"{folder}/00000.tar,{bad}", SPEC, batch_size=5, open_retries=2, retry_wait_s=0.01)
    assert all(len(next(pipe).keys) == 5 for _ in range(3))  # the run goes on with what it can read
    assert f"{bad}:*" in pipe.streams["image"].skipped


def test_a_mixed_image_and_av_tar_trains_both_tasks(tmp_path):
    from selfflow.training.loop import train

    folder = mixed_corpus(tmp_path / "mixed")
    cfg = load_config(
        "tiny",
        [f"data.shards={folder}", f"run.dir={tmp_path / 'run'}", "data.weights={image: 1, av: 1}",
         "train.batch_size=2", "train.max_steps=6", "train.log_every=1", "sample.num=1", "sample.steps=1"],
    )  # fmt: skip
    train(cfg, progress=False)
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert last["samples_seen_image"] > 0 and last["samples_seen_av"] > 0
    assert last["samples_seen_image"] + last["samples_seen_av"] == last["samples_seen"] == 12


def test_the_source_benchmark_reads_the_same_samples_from_every_source(capsys):
    from selfflow.tools import bench_sources

    assert bench_sources.main(["--images", "40", "--rounds", "1", "--batch", "8", "--preset", "tiny"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["samples_per_s"]) == {"brace_pattern", "pipe_cat", "make_shards"}
    assert all(v > 0 for v in result["samples_per_s"].values())
    assert result["ratio_to_make_shards"]["make_shards"] == 1.0
