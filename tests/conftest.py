"""Shared fixtures: the tiny preset and a randomised model (the real init zeroes every output, which
would make equality tests pass vacuously)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from selfflow.configs import load_config  # noqa: E402
from selfflow.models.factory import build_model  # noqa: E402
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
