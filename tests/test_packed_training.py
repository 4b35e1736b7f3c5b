"""Sequence packing end to end: the reader fills each batch up to a token budget with samples of any
task, and a mixed image + video + audio + AV run trains packed and resumes exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import av_clip, write_random_images

from selfflow.configs import ConfigError, load_config
from selfflow.data.pipeline import TASK_MODALITIES, DataError, DataPipeline
from selfflow.data.shards import ShardWriter
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.loop import train
from selfflow.training.tracking import read_metrics

BUDGET = 700  # tiny: image 64 + 48 caption tokens, video 128 + 48, audio 25 + 48, av 153 + 48


@pytest.fixture(scope="module")
def four_tasks(mixed_shards, tmp_path_factory) -> Path:
    """The mixed av / audio shards plus image and video-only ones, at least 2 shards per task."""
    root = tmp_path_factory.mktemp("four_tasks")
    for tar in [*Path(mixed_shards).glob("av-*.tar"), *Path(mixed_shards).glob("audio-*.tar")]:
        shutil.copy(tar, root / tar.name)
    write_random_images(root, 8, 4, "a picture {i}")
    with ShardWriter(root, "video", max_samples=4) as w:
        for i in range(8):
            clip = av_clip(i, with_audio=False)
            w.write({"__key__": f"video_{i:03d}", "mp4": clip, "txt": f"a square {i}"})
    return root


def _pipe(shards: Path, **kw) -> DataPipeline:
    spec = load_config("tiny").spec
    weights = {"image": 1, "video": 1, "audio": 1, "av": 1}
    return DataPipeline(shards, spec, seed=3, weights=weights, tokens_per_batch=BUDGET, text_tokens=48, **kw)


def test_packed_batches_fill_the_budget_with_samples_of_every_task(four_tasks):
    pipe = _pipe(four_tasks)
    seen, cost = set(), pipe.sample_tokens
    for _ in range(6):
        batch = next(pipe)
        assert batch.task == "packed" and len(batch.tasks) == len(batch.keys) == len(batch.captions)
        used = sum(cost[t] for t in batch.tasks)
        assert used <= BUDGET and used > BUDGET - max(cost.values())  # full up to one sample
        for m, x in batch.media.items():  # each modality stacks the samples that have it
            assert x.shape[0] == sum(m in TASK_MODALITIES[t] for t in batch.tasks)
        seen |= set(batch.tasks)
    assert seen == {"image", "video", "audio", "av"}
    ranks = [_pipe(four_tasks, rank=r, world=2) for r in (0, 1)]  # every rank packs the same tasks
    steps = [[next(p) for _ in range(3)] for p in ranks]
    assert [b.tasks for b in steps[0]] == [b.tasks for b in steps[1]]
    assert not set(steps[0][0].keys) & set(steps[1][0].keys)  # from their own shards


def test_a_packed_position_resumes_exactly(four_tasks):
    pipe = _pipe(four_tasks)
    for _ in range(3):
        next(pipe)
    state = pipe.state_dict()
    expected = [next(pipe).keys for _ in range(3)]
    resumed = _pipe(four_tasks)
    resumed.load_state_dict(state)
    assert [next(resumed).keys for _ in range(3)] == expected


def test_a_budget_below_one_sample_is_refused(four_tasks):
    spec = load_config("tiny").spec
    with pytest.raises(DataError, match="tokens_per_batch=100 is below one sample"):
        DataPipeline(four_tasks, spec, weights={"av": 1}, tokens_per_batch=100, text_tokens=48)
    with pytest.raises(ConfigError, match="data.pack needs data.tokens_per_batch"):
        load_config("tiny", ["data.pack=true"])


def _tiny(shards: Path, run: Path, *extra: str):
    return load_config("tiny", [f"data.shards={shards}", f"run.dir={run}", "data.pack=true",
                                f"data.tokens_per_batch={BUDGET}", "train.log_every=1", "train.ckpt_every=2",
                                "data.weights={image: 1, video: 1, audio: 1, av: 1}", "sample.num=2",
                                "sample.steps=2", "data.shuffle_buffer=4", *extra])  # fmt: skip


@pytest.mark.slow
def test_a_mixed_run_trains_packed_and_resumes_exactly(four_tasks, tmp_path):
    """image + video + audio + AV samples packed into each step's row: 4 steps straight == 2 steps,
    stop, resume to 4 (losses, weights and EMA bitwise); every task is trained."""
    train(_tiny(four_tasks, tmp_path / "a", "train.max_steps=4"), progress=False)
    train(_tiny(four_tasks, tmp_path / "b", "train.max_steps=2"), progress=False)
    train(_tiny(four_tasks, tmp_path / "b", "train.max_steps=4"), progress=False)
    rows = [[r for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("a", "b")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for key in ("loss", "loss_gen", "rep_cos", "grad_norm"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    last = rows[0][-1]
    assert all(last[f"samples_seen_{t}"] > 0 for t in ("image", "video", "audio", "av")), last
    assert last["samples_seen"] == sum(last[f"samples_seen_{t}"] for t in ("image", "video", "audio", "av"))
    a, b = (ckpt_io.latest_checkpoint(tmp_path / d / "checkpoints") for d in ("a", "b"))
    for name in ("model", "ema", "head"):
        wa, wb = ckpt_io.load_weights(a, name), ckpt_io.load_weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert (tmp_path / "a" / "samples" / "step_00000004.png").is_file()  # sampling is unchanged


def test_resuming_a_packed_position_with_another_budget_is_refused(four_tasks):
    pipe = _pipe(four_tasks)
    next(pipe)
    other = DataPipeline(
        four_tasks, load_config("tiny").spec, seed=3, weights={"image": 1, "video": 1, "audio": 1, "av": 1},
        tokens_per_batch=BUDGET + 100, text_tokens=48,
    )  # fmt: skip
    with pytest.raises(DataError, match="packs 700 tokens per batch"):
        other.load_state_dict(pipe.state_dict())
