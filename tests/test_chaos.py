"""The issue's acceptance run: a corpus salted with hostile files and damaged shards, trained by
`training/main.py` while it is SIGKILLed at random moments and in the middle of checkpoint saves, then
relaunched each time, ends with the same weights, EMA and data counters as one uninterrupted run."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hostile_media import flac_claiming, png, png_of_zeros, tiff

from selfflow.data.shards import ShardWriter, iter_tar_samples
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def salted(fmnist_shards, tmp_path_factory) -> Path:
    """48 Fashion-MNIST samples in 3 shards, one shard of hostile samples and one cut inside a tar
    header: 58 good samples, so that the run's 192 samples go through the salt at least three times."""
    folder = tmp_path_factory.mktemp("salted")
    fmnist = iter_tar_samples(next(Path(fmnist_shards).glob("image-*.tar")))
    with ShardWriter(folder, "image", max_samples=16) as w:
        for _, sample in zip(range(48), fmnist, strict=False):
            w.write(sample)
    with ShardWriter(folder, "image", start_index=90) as w:
        w.write({"__key__": "tiff_as_png", "png": tiff(), "txt": "a red square"})
        w.write({"__key__": "bomb", "png": png_of_zeros(12_000, 12_000), "txt": "a black square"})
        w.write({"__key__": "flac_as_png", "png": flac_claiming((1 << 36) - 1), "txt": "noise"})
        w.write({"__key__": "no_caption", "png": png(3)})
        w.write({"__key__": "cut", "png": png(4)[:60], "txt": "half an image"})
        for i in range(6):
            w.write({"__key__": f"fine_{i}", "png": png(i), "txt": f"a green square {i}"})
    with ShardWriter(folder, "image", start_index=91) as w:
        for i in range(8):
            w.write({"__key__": f"torn_{i}", "png": png(i), "txt": f"a square {i}"})
    torn = folder / "image-000091.tar"
    torn.write_bytes(torn.read_bytes()[: 4 * 2048 + 100])  # inside the 5th sample's first header
    return folder


def _command(shards: Path, run: Path) -> list[str]:
    return [sys.executable, "training/main.py", "--config", "tiny", "--no-progress",
            f"data.shards={shards}", f"run.dir={run}", f"train.max_steps={STEPS}", "train.batch_size=8",
            "train.log_every=1", "train.ckpt_every=1", "train.keep_last=2", "data.shuffle_buffer=32",
            "sample.num=1", "sample.steps=1"]  # fmt: skip


def _kill_when(proc: subprocess.Popen, predicate, deadline: float) -> bool:
    """SIGKILL `proc` as soon as `predicate()` holds; False if it exited first."""
    while proc.poll() is None and time.monotonic() < deadline:
        if predicate():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def _step_of(name: str) -> int:
    found = re.search(r"step_(\d+)", name)
    return int(found.group(1)) if found else -1


def _saving(run: Path, after: int):
    """True while a checkpoint of a step > `after` is being written (its temporary folder exists)."""
    root = run / "checkpoints"
    return lambda: (
        root.is_dir() and any(p.name.startswith(".tmp") and _step_of(p.name) > after for p in root.iterdir())
    )


def _logged(run: Path, step: int):
    """True once metrics.jsonl has reached `step`."""
    path = run / "metrics.jsonl"
    return lambda: path.is_file() and any(f'"step": {step},' in line for line in path.open())


@pytest.mark.slow
def test_killed_and_relaunched_run_ends_like_an_uninterrupted_one(salted, tmp_path):
    straight = subprocess.run(_command(salted, tmp_path / "a"), cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    run, rng, kills = tmp_path / "b", random.Random(0), []
    for attempt in range(12):
        latest = ckpt_io.latest_checkpoint(run / "checkpoints")
        done = _step_of(latest.name) if latest is not None else 0
        proc = subprocess.Popen(
            _command(salted, run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if attempt < 8 and done < STEPS - 4:
            if attempt % 2:  # in the middle of writing a checkpoint, two saves after the resume
                stop = _saving(run, after=done + 2)
            else:  # at a random step, a random fraction of a step later (training, logging, saving)
                reached, delay = _logged(run, done + rng.randint(1, 3)), rng.uniform(0, 0.3)
                stop = lambda reached=reached, delay=delay: reached() and (time.sleep(delay) or True)  # noqa: E731
            if _kill_when(proc, stop, time.monotonic() + 120):
                kills.append((attempt, done))
                continue
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        if json.loads(out.decode().strip().splitlines()[-1])["step"] == STEPS:
            break
    assert len(kills) >= 6 and sum(attempt % 2 for attempt, _ in kills) >= 3, kills
    a, b = (ckpt_io.latest_checkpoint(tmp_path / d / "checkpoints") for d in ("a", "b"))
    assert a.name == b.name == ckpt_io.checkpoint_name(STEPS)
    for name in ("model", "ema", "head"):
        wa, wb = ckpt_io.load_weights(a, name), ckpt_io.load_weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    rows = [[r for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in "ab"]
    assert [r["step"] for r in rows[1]] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "samples_seen", "skipped_samples"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    assert rows[0][-1]["skipped_samples"] >= 6  # the salt was met, skipped and counted
    events = [
        [(r["step"], r["sample"], r["reason"]) for r in read_metrics(tmp_path / d / "metrics.jsonl")
         if r.get("event") == "skipped_sample"]
        for d in "ab"
    ]  # fmt: skip
    assert events[0] == events[1]
    reasons = {sample.split(":")[-1]: reason for _, sample, reason in events[0]}
    assert "not an allowed image format" in reasons["tiff_as_png"] and "pixel limit" in reasons["bomb"]
    assert "caption" in reasons["no_caption"] and "end-of-archive" not in reasons.get("*", "")
    assert any("damaged tar header" in r for r in reasons.values())  # the torn shard, counted once per epoch
