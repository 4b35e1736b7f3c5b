"""The mixed-task pipeline on real shards: per-task shapes and counts, weights, bad members skipped with
their keys, strict mode, rank split, and exact save/restore of the stream position."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.configs import load_config
from selfflow.data.pipeline import DataError, DataPipeline, WorkerPipeline
from selfflow.data.sources import resolve_shards
from selfflow.data.streams import TaskStream

SPEC = load_config("tiny").spec  # 1 s, 8 fps, 32x32, 16 kHz mono
BAD = {"av_bad_trunc", "av_bad_nocap", "audio_bad_empty"}


@pytest.fixture(scope="module")
def shards(mixed_shards) -> Path:
    return mixed_shards


def test_each_task_gives_spec_shaped_batches_and_skips_exactly_the_bad_members(shards):
    pipe = DataPipeline(
        shards, SPEC, seed=0, weights={"av": 1, "audio": 1}, batch_sizes={"av": 4, "audio": 2}
    )
    seen: dict[str, set[str]] = {"av": set(), "audio": set()}
    for _ in range(12):
        b = next(pipe)
        seen[b.task] |= set(b.keys)
        n = pipe.batch_sizes[b.task]
        if b.task == "av":
            assert b.media["video"].shape == (n, 3, 8, 32, 32) and b.media["audio"].shape == (n, 1, 16_000)
        else:
            assert set(b.media) == {"audio"} and b.media["audio"].shape == (n, 1, 16_000)
        assert all(x.dtype == torch.float32 and x.abs().max() <= 1 for x in b.media.values())
    assert seen["av"] == {f"av_{i:03d}" for i in range(12)} and seen["audio"] == {
        f"audio_{i:03d}" for i in range(6)
    }
    skipped = {k.split(":")[-1] for s in pipe.streams.values() for k in s.skipped}
    assert skipped == BAD
    reasons = {k.split(":")[-1]: r for s in pipe.streams.values() for k, r in s.skipped.items()}
    assert "caption" in reasons["av_bad_nocap"]


def test_av_clips_keep_sync_after_decoding(shards):
    stream = TaskStream("av", resolve_shards(shards, "av"), SPEC, shuffle_buffer=0)
    for _ in range(12):
        s = next(stream)
        frame = int(np.nonzero(s.media["video"].mean(axis=(0, 2, 3)) > -0.9)[0][0])  # first lit frame
        onset = int(np.nonzero(np.abs(s.media["audio"][0]) > 0.3)[0][0])
        assert onset / SPEC.sample_rate == pytest.approx(frame / SPEC.fps, abs=0.002), s.key


def test_every_rank_draws_the_same_task_for_a_step_and_reads_its_own_shards(shards):
    """Sharded engines (FSDP2, ZeRO-3) need every rank to run the same modules in a step."""
    kwargs = dict(seed=4, weights={"av": 1, "audio": 1}, batch_size=2, world=2)  # 4 and 2 shards
    ranks = [DataPipeline(shards, SPEC, rank=r, **kwargs) for r in range(2)]
    batches = [[next(p) for _ in range(12)] for p in ranks]
    assert [b.task for b in batches[0]] == [b.task for b in batches[1]]
    assert len({b.task for b in batches[0]}) == 2
    for task in ("av", "audio"):  # each rank still reads its own shards
        mine = [set(p.streams[task]._my_shards(0)) for p in ranks]
        assert mine[0] and mine[1] and not mine[0] & mine[1]


def test_weights_pick_tasks_and_image_batches_match_the_loader_layout(shards):
    pipe = DataPipeline(shards, SPEC, seed=1, weights={"image": 3, "av": 1}, batch_size=2)
    assert pipe.next_task() == next(pipe).task  # the draw depends only on (seed, worker, batch index)
    tasks = [next(pipe).task for _ in range(40)]
    assert 0.6 < tasks.count("image") / len(tasks) < 0.9 and "audio" not in tasks
    img = next(b for b in (next(pipe) for _ in range(10)) if b.task == "image")
    assert img.media["image"].shape == (2, 3, 32, 32) and all(
        c.startswith("a photo of") for c in img.captions
    )


def test_restore_continues_with_the_identical_next_batches(shards):
    kw = dict(weights={"image": 1, "av": 1, "audio": 1}, batch_sizes={"image": 8, "av": 3, "audio": 2})
    a = DataPipeline(shards, SPEC, seed=3, **kw)
    for _ in range(9):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    b = DataPipeline(shards, SPEC, seed=3, **kw)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        assert got.task == want.task and got.keys == want.keys
        for m in want.media:
            assert torch.equal(got.media[m], want.media[m])


def test_strict_mode_raises_on_the_first_bad_member(shards):
    stream = TaskStream("audio", resolve_shards(shards, "audio"), SPEC, strict=True, shuffle_buffer=0)
    with pytest.raises(DataError, match="audio_bad_empty"):
        for _ in range(20):
            next(stream)


def test_ranks_read_disjoint_shards_and_too_many_processes_fail_at_start(shards):
    av = resolve_shards(shards, "av")  # 4 shards
    keys = []
    for rank in range(2):
        stream = TaskStream("av", av, SPEC, rank=rank, world=2, shuffle_buffer=0)
        keys.append({next(stream).key for _ in range(3)})  # within epoch 0: at least 4 good per rank
    assert not keys[0] & keys[1]
    with pytest.raises(ValueError, match="every process needs a shard"):
        TaskStream("av", av, SPEC, world=3, workers=2)
    with pytest.raises(FileNotFoundError, match="video"):
        DataPipeline(shards, SPEC, weights={"video": 1})


def test_worker_pipeline_splits_shards_and_restores_the_exact_next_batch(shards):
    kw = dict(
        shards=shards, spec=SPEC, seed=2, weights={"av": 1, "audio": 1}, batch_sizes={"av": 2, "audio": 2}
    )
    a = WorkerPipeline(kw, workers=2)
    first = [next(a) for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    expected = [next(a) for _ in range(4)]
    b = WorkerPipeline(kw, workers=2)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        assert (got.task, got.keys) == (want.task, want.keys)
        assert all(torch.equal(got.media[m], want.media[m]) for m in want.media)
    assert {k for x in first for k in x.keys} <= {f"av_{i:03d}" for i in range(12)} | {
        f"audio_{i:03d}" for i in range(6)
    }
    with pytest.raises(ValueError, match="every process needs a shard"):
        WorkerPipeline({**kw, "weights": {"audio": 1}}, workers=3)  # 2 audio shards


@pytest.fixture(scope="module")
def benchmark_shards(tmp_path_factory) -> tuple[Path, Path]:
    """The offline benchmark (text, video, audio, AV ball) -> shards re-encoded to the tiny spec."""
    root = tmp_path_factory.mktemp("bench")
    tools = Path(__file__).resolve().parents[1] / "tools"
    media = root / "media"
    for task, extra in (
        ("text", []),
        ("video", ["--duration", "1"]),
        ("audio", ["--duration", "1"]),
        ("av", ["--scene", "ball", "--duration", "1"]),
    ):
        out = root / task
        run(
            [
                sys.executable,
                str(tools / "make_benchmark.py"),
                "--task",
                task,
                "--n",
                "6",
                "--out",
                str(out),
                *extra,
            ]
        )
        media.mkdir(exist_ok=True)
        for f in out.iterdir():
            shutil.copy(f, media / f.name)
    run(
        [
            sys.executable,
            str(tools / "make_shards.py"),
            "--input",
            str(media),
            "--output",
            str(root / "shards"),
            "--spec",
            "tiny",
            "--quiet",
        ]
    )
    return root / "shards", media


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_benchmark_folder_to_shards_to_pipeline_keeps_every_sample(benchmark_shards):
    shards, media = benchmark_shards
    for task in ("image", "video", "audio", "av"):
        stream = TaskStream(task, resolve_shards(shards, task), SPEC, shuffle_buffer=0)
        keys = [next(stream).key for _ in range(6)]
        assert len(set(keys)) == 6 and stream.epoch == 0 and stream.skipped_count == 0, task
        assert all(k.endswith("_c000") or task == "image" for k in keys)  # one spec-long clip per input
        sources = {k.removesuffix("_c000") for k in keys}
        assert all((media / f"{k}.txt").is_file() for k in sources), task


def test_benchmark_ball_bounces_stay_in_sync_through_shards_and_decoding(benchmark_shards):
    shards, media = benchmark_shards
    stream = TaskStream("av", resolve_shards(shards, "av"), SPEC, shuffle_buffer=0)
    checked = 0
    for _ in range(6):
        s = next(stream)
        meta = json.loads((media / f"{s.key.removesuffix('_c000')}.json").read_text())
        events = [e for e in meta["event_times"] if e < SPEC.duration]
        env = np.abs(s.media["audio"][0])
        onsets = [i / SPEC.sample_rate for i in range(1, env.size) if env[i] > 0.1 >= env[i - 1]]
        for e in events:  # an impact sound starts within 10 ms of its recorded time
            assert min(abs(o - e) for o in onsets) < 0.01, (s.key, e, onsets)
            checked += 1
    assert checked > 0


def test_several_shard_folders_feed_one_pipeline(shards, fmnist_shards):
    """`a,b`: every task reads the shards of all the folders that have it (commas in braces stay)."""
    from selfflow.data.pipeline import available_tasks
    from selfflow.data.sources import split_sources

    assert split_sources(f"{shards}, x-{{a,b}}.tar") == [str(shards), "x-{a,b}.tar"]
    both = f"{shards},{fmnist_shards}"
    assert available_tasks(both) == ["image", "audio", "av"]
    pipe = DataPipeline(both, SPEC, seed=0, weights={"image": 1, "av": 1}, batch_size=2)
    image_shards = pipe.streams["image"].shards
    assert len(image_shards) == 2 * len(resolve_shards(fmnist_shards, "image"))
    assert pipe.streams["av"].shards == resolve_shards(shards, "av")  # only one folder has av
    assert {next(pipe).task for _ in range(6)} == {"image", "av"}


def test_pad_fit_letterboxes_images_with_their_border():
    """data.image_fit=pad: a square image in a 32x64 spec keeps all its pixels, centred, with the border
    colour extended to the sides; crop cuts it to fill the frame."""
    from PIL import Image

    from selfflow.data.decode import png_bytes
    from selfflow.data.streams import decode_sample

    spec = load_config("default").spec  # images 32x64
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = 255  # a white square on black
    raw = {"__key__": "sq", "png": png_bytes(Image.fromarray(pixels)), "txt": b"a square"}
    padded = decode_sample(raw, "image", spec, "pad").media["image"]  # [3, 32, 64]
    assert padded.shape == (3, 32, 64)
    np.testing.assert_array_equal(padded[:, :, 16:48], pixels.transpose(2, 0, 1) / 127.5 - 1)
    assert (padded[:, :, :16] == -1).all() and (padded[:, :, 48:] == -1).all()
    cropped = decode_sample(raw, "image", spec, "crop").media["image"]
    assert cropped.shape == (3, 32, 64) and (cropped > 0.9).mean() > 0.4  # the square, scaled up, fills half
    with pytest.raises(ValueError, match="image_fit"):
        DataPipeline("unused", spec, image_fit="stretch")
