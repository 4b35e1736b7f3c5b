"""Shared fixtures: the tiny preset and a randomised model (the real init zeroes every output, which
would make equality tests pass vacuously)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from selfflow.configs import load_config  # noqa: E402
from selfflow.configs.factory import build_model  # noqa: E402
from selfflow.data.avio import encode_mp4  # noqa: E402
from selfflow.data.shards import ShardWriter  # noqa: E402
from selfflow.models.mmdit import MMDiT  # noqa: E402


def randomize(model: MMDiT, seed: int = 0) -> MMDiT:
    """Overwrite every parameter with N(0, 0.05) so that modulation, gates and outputs are non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config("tiny")


@pytest.fixture
def tiny_model(tiny_cfg) -> MMDiT:
    torch.manual_seed(0)
    return randomize(build_model(tiny_cfg)).eval()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are skipped, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> Path:
    """Image shards of 256 real Fashion-MNIST training images with class captions, built by the CLIs."""
    root = tmp_path_factory.mktemp("fmnist")
    tools = Path(__file__).resolve().parents[1] / "tools"
    for cmd in (
        [
            str(tools / "make_benchmark.py"),
            "--task",
            "class",
            "--n",
            "256",
            "--seed",
            "0",
            "--out",
            str(root / "media"),
        ],
        [str(tools / "make_shards.py"), "--input", str(root / "media"), "--output", str(root / "shards")],
    ):
        subprocess.run([sys.executable, *cmd], check=True, capture_output=True, text=True)
    return root / "shards"


def av_clip(i: int, with_audio: bool = True) -> bytes:
    """A 1 s clip: a white square appears at frame 2 + i % 4, with a click at that moment."""
    frame = 2 + i % 4
    video = np.zeros((8, 32, 32, 3), np.uint8)  # [T, H, W, 3] at 8 fps
    video[frame:, 8:24, 8:24] = 255
    audio = np.zeros((1, 16_000), np.float32)
    audio[0, frame * 2000 : frame * 2000 + 200] = 0.8
    return encode_mp4(video, 8, audio if with_audio else None, 16_000)


def flac(i: int) -> bytes:
    buf = io.BytesIO()
    tone = 0.3 * np.sin(np.arange(16_000) * (0.05 + 0.01 * i)).astype(np.float32)
    soundfile.write(buf, tone, 16_000, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="session")
def mixed_shards(fmnist_shards, tmp_path_factory) -> Path:
    """image (256 Fashion-MNIST), av (12 good + 2 bad), audio (6 good + 1 bad) shard sets in one folder."""
    root = tmp_path_factory.mktemp("mixed")
    for tar in Path(fmnist_shards).glob("image-*.tar"):
        shutil.copy(tar, root / tar.name)
    with ShardWriter(root, "av", max_samples=4) as w:
        for i in range(12):
            w.write(
                {"__key__": f"av_{i:03d}", "mp4": av_clip(i), "txt": f"a square appears at frame {2 + i % 4}"}
            )
        w.write({"__key__": "av_bad_trunc", "mp4": av_clip(0)[:900], "txt": "truncated"})
        w.write({"__key__": "av_bad_nocap", "mp4": av_clip(1), "json": "{}"})
    with ShardWriter(root, "audio", max_samples=4) as w:
        for i in range(6):
            w.write({"__key__": f"audio_{i:03d}", "flac": flac(i), "txt": f"a tone {i}"})
        w.write({"__key__": "audio_bad_empty", "flac": b"", "txt": "nothing"})
    return root


@pytest.fixture(scope="session")
def av_ckpt(mixed_shards, tmp_path_factory) -> Path:
    """A checkpoint of the tiny preset after 2 AV training steps (for the sampling CLIs)."""
    from selfflow.training.checkpoint import latest_checkpoint
    from selfflow.training.loop import train

    run_dir = tmp_path_factory.mktemp("avrun")
    cfg = load_config(
        "tiny",
        [f"data.shards={mixed_shards}", f"run.dir={run_dir}", "data.weights={av: 1}", "train.batch_size=2",
         "train.max_steps=2", "sample.num=1", "sample.steps=1"],
    )  # fmt: skip
    train(cfg, progress=False)
    return latest_checkpoint(run_dir / "checkpoints")


HOLD_LOCK = """
import sys, time
from selfflow.training.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def hold_run_lock():
    """start(run_dir) -> another process holding run_dir's lock (killed at teardown at the latest)."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()


def write_random_images(folder: Path, n: int, per_shard: int, caption: str = "pattern number {i}") -> None:
    """n random 32x32 PNG image samples, `per_shard` to a shard, captions `caption.format(i=i)`."""
    rng = np.random.default_rng(0)
    with ShardWriter(folder, "image", max_samples=per_shard) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            w.write({"__key__": f"img_{i:03d}", "png": buf.getvalue(), "txt": caption.format(i=i)})


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """4 image shards of 6 random 32x32 PNGs with distinct captions (for the multi-process tests: every
    rank needs its own shards)."""
    root = tmp_path_factory.mktemp("dist_shards")
    write_random_images(root, 24, 6)
    return root
