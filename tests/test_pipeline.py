"""The mixed-task pipeline on real shards: per-task shapes and counts, weights, bad members skipped with
their keys, strict mode, rank split, and exact save/restore of the stream position."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.configs import load_config
from selfflow.data.loader import resolve_shards
from selfflow.data.pipeline import DataError, DataPipeline, TaskStream, WorkerPipeline

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


def test_weights_pick_tasks_and_image_batches_match_the_loader_layout(shards):
    pipe = DataPipeline(shards, SPEC, seed=1, weights={"image": 3, "av": 1}, batch_size=2)
    assert pipe.next_task() == next(pipe).task  # the draw depends only on (seed, rank, batch index)
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
