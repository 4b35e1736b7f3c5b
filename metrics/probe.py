"""Representation quality of a flow model (issue 7): how linearly separable, and how well clustered, the
Fashion-MNIST classes are in each block's media hidden states at fixed noise levels.

    report = probe_report(model, cfg, n_train=1000, n_test=500, levels=(0.0, 0.25, 0.5))
    report["levels"][0.25][3]  # {"linear": 0.71, "knn": 0.66}: block 3 (1-indexed) at t = 0.25

Images are decoded like the training reader does (`decode_sample` with the config's `data.image_fit`),
noised with `selfflow.models.flow` (t = 0 is data) using one fixed-seed noise draw shared by every level,
block and model of the same spec, and the model sees the null caption unless told otherwise (a class
caption would hand it the label). Each block's hidden states [N, L, D] are mean-pooled over the media
tokens; a softmax regression (full-batch L-BFGS) and a cosine k-NN are scored on held-out test images.
The raw pixels get the same two probes as a reference row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfflow.configs.factory import TextConditioner, build_media_tokenizer, build_text_conditioner
from selfflow.configs.schema import Config
from selfflow.data.benchmark.classes import balanced_indices
from selfflow.data.decode import png_bytes
from selfflow.data.packaged import FASHION_MNIST_CLASSES, fashion_mnist_caption, load_fashion_mnist
from selfflow.data.streams import decode_sample
from selfflow.models import flow
from selfflow.models.mmdit import MMDiT
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tokenizers.spec import ClipSpec

DEFAULT_LEVELS = (0.0, 0.25, 0.5)
KNN_TEMPERATURE = 0.07  # similarity weighting exp(cos / T), as in DINO's k-NN evaluation


def decode_images(images: np.ndarray, spec: ClipSpec, image_fit: str = "crop") -> torch.Tensor:
    """uint8 images [N, H0, W0] (or [N, H0, W0, 3]) -> float32 [N, C, H, W] in [-1, 1] at the spec's
    image size, through the training reader's `decode_sample` (PNG bytes, as in the shards)."""
    out = []
    for i, img in enumerate(images):
        raw = {"__key__": str(i), "png": png_bytes(Image.fromarray(img)), "txt": b"-"}
        out.append(decode_sample(raw, "image", spec, image_fit).media["image"])  # [C, H, W]
    return torch.from_numpy(np.stack(out))


@torch.no_grad()
def hidden_features(
    model: MMDiT,
    media_tokenizer: MediaTokenizer,
    images: torch.Tensor,
    t: float,
    *,
    encode_text: TextConditioner,
    captions: Sequence[str] | None = None,
    blocks: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[int, np.ndarray]:
    """Mean-pooled media hidden states per block: {block (1-indexed): float32 [N, D]}.

    images: [N, C, H, W] in [-1, 1] at the model's spec. The clean tokens are noised at level t with
    noise drawn for all N images at once from a generator seeded with `seed`, so any t, block or model
    of the same spec sees the same noise. captions=None gives every image the null caption (drop_txt);
    else each image is conditioned on its caption."""
    blocks = sorted(blocks or range(1, model.params.depth + 1))
    device = next(model.parameters()).device
    ids = media_tokenizer.position_ids(["image"]).to(device)  # [L, 4]
    gen = torch.Generator().manual_seed(seed)
    noise = None  # [N, L, C], drawn once the token shape is known
    feats: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    model.eval()
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)  # [B, C, H, W]
        x0 = media_tokenizer.encode({"image": x})[0]["image"]  # [B, L, C]
        if noise is None:
            noise = torch.randn((len(images), *x0.shape[1:]), generator=gen, dtype=x0.dtype)
        eps = noise[start : start + len(x)].to(device)  # [B, L, C]
        level = torch.full((len(x),), float(t), device=device)  # [B]
        chunk = [""] * len(x) if captions is None else list(captions[start : start + len(x)])
        txt, mask = encode_text(chunk)  # [B, Lt], [B, Lt]
        drop = torch.full((len(x),), captions is None, dtype=torch.bool, device=device)  # [B]
        out = model(
            {"image": flow.interpolate(x0, eps, level)},
            ids,
            level,
            txt,
            txt_mask=mask,
            drop_txt=drop,
            return_hidden=blocks,
            stop_after=blocks[-1],
        )
        for b in blocks:
            feats[b].append(out.hidden[b].float().mean(dim=1).cpu())  # [B, D]
    return {b: torch.cat(v).numpy() for b, v in feats.items()}


def _standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the train set's per-feature mean and standard deviation."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 100,
) -> float:
    """Test accuracy of a softmax regression fitted on standardised train features [N, D] (labels [N]) by
    full-batch L-BFGS on cross-entropy + weight_decay * |W|^2 (bias not decayed). It starts from zero
    weights and draws nothing, so the same features give the same accuracy."""
    xtr, xte = _standardize(torch.as_tensor(train_x).float(), torch.as_tensor(test_x).float())  # [N, D]
    ytr, yte = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    classes = int(max(ytr.max(), yte.max())) + 1
    weight = torch.zeros(xtr.shape[1], classes, requires_grad=True)  # [D, K]
    bias = torch.zeros(classes, requires_grad=True)  # [K]
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, ytr) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xte @ weight + bias).argmax(1)  # [N_test]
    return float((pred == yte).double().mean())


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    k: int = 10,
    weighted: bool = False,
    center: bool = True,
) -> float:
    """Test accuracy of a k-NN vote over cosine similarity to the train features. `center` subtracts the
    train mean first (pooled hidden states share a large common direction that would make every cosine
    near 1); `weighted` votes with exp(cos / 0.07), else one vote per neighbour, ties going to the
    class with the larger summed similarity."""
    xtr, xte = torch.as_tensor(train_x, dtype=torch.float64), torch.as_tensor(test_x, dtype=torch.float64)
    if center:
        mean = xtr.mean(0)
        xtr, xte = xtr - mean, xte - mean
    ytr, yte = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    sim = F.normalize(xte, dim=1) @ F.normalize(xtr, dim=1).T  # [N_test, N_train]
    top, idx = sim.topk(min(k, len(ytr)), dim=1)  # [N_test, k]
    votes = torch.exp(top / KNN_TEMPERATURE) if weighted else 1.0 + 1e-6 * top  # [N_test, k]
    classes = int(max(ytr.max(), yte.max())) + 1
    scores = torch.zeros(len(yte), classes, dtype=torch.float64).scatter_add_(1, ytr[idx], votes)
    return float((scores.argmax(1) == yte).double().mean())


def probe_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 10
) -> dict[str, float]:
    """{"linear": accuracy, "knn": accuracy} of one feature set."""
    return {
        "linear": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        "knn": knn_accuracy(train_x, train_y, test_x, test_y, k=k),
    }


def fashion_mnist_split(split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n class-balanced images uint8 [n, 28, 28] and labels [n] of one Fashion-MNIST split."""
    images, labels = load_fashion_mnist(split)
    index = np.sort(balanced_indices(labels, n, np.random.default_rng(seed)))
    return images[index], labels[index]


def probe_report(
    model: MMDiT,
    cfg: Config,
    n_train: int = 1000,
    n_test: int = 500,
    levels: Sequence[float] = DEFAULT_LEVELS,
    *,
    captions: str = "null",
    k: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Linear-probe and k-NN accuracy per level and block on Fashion-MNIST (train split -> test split):
    {"levels": {t: {block: {"linear", "knn"}}}, "pixels": {"linear", "knn"}, "chance", ...}.

    captions: "null" (default: the model's dropped caption, no label leak) or "class" (each image's class
    caption, which leaks the label: an upper-bound diagnostic only). `seed` picks the images and the noise
    (train set: seed, test set: seed + 1).
    """
    if captions not in ("null", "class"):
        raise ValueError(f"captions must be 'null' or 'class', got {captions!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    media, encode_text = build_media_tokenizer(cfg, device), build_text_conditioner(cfg.text, device)
    sets = {}
    for split, n in (("train", n_train), ("test", n_test)):
        raw, labels = fashion_mnist_split(split, n, seed)
        text = [fashion_mnist_caption(int(y)) for y in labels] if captions == "class" else None
        sets[split] = (decode_images(raw, cfg.spec, cfg.data.image_fit), labels, text)
    (xtr, ytr, ctr), (xte, yte, cte) = sets["train"], sets["test"]
    report: dict[str, Any] = {
        "n_train": n_train,
        "n_test": n_test,
        "captions": captions,
        "chance": 1.0 / len(FASHION_MNIST_CLASSES),
        "pixels": probe_scores(xtr.flatten(1).numpy(), ytr, xte.flatten(1).numpy(), yte, k),
        "levels": {},
    }
    for t in levels:  # train and test images get different noise (seed, seed + 1), the same at every t
        kw = dict(encode_text=encode_text, batch_size=batch_size)
        ftr = hidden_features(model, media, xtr, t, captions=ctr, seed=seed, **kw)
        fte = hidden_features(model, media, xte, t, captions=cte, seed=seed + 1, **kw)
        report["levels"][float(t)] = {b: probe_scores(ftr[b], ytr, fte[b], yte, k) for b in ftr}
    return report
