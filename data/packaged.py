"""Real data that ships inside system packages, readable offline.

Only Fashion-MNIST so far (Debian `dataset-fashion-mnist`: 60k train + 10k test grey 28x28 images
in 10 classes). Later sources (rendered emoji, text, speech prompts) add a loader here each, and use
`with_article` to build their captions.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
_IDX_HEADER = {"images": 16, "labels": 8}  # bytes before the payload in each IDX file

# Words whose spelling and sound disagree about the article ("a unicorn", "an hour").
_A_DESPITE_VOWEL = ("uni", "use", "usu", "eu", "one", "once")
_AN_DESPITE_CONSONANT = ("hour", "honest", "honour", "honor", "heir")


def _read_idx(path: Path, kind: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=_IDX_HEADER[kind])


def load_fashion_mnist(
    split: str = "train", root: str | Path = FASHION_MNIST_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of one split ("train" or "test")."""
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(
            f"unknown Fashion-MNIST split {split!r}; expected one of {tuple(_FASHION_MNIST_FILES)}"
        )
    root = Path(root)
    prefix = _FASHION_MNIST_FILES[split]
    image_file = root / f"{prefix}-images-idx3-ubyte.gz"
    label_file = root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found; install it with: apt-get install dataset-fashion-mnist"
            )
    images = _read_idx(image_file, "images").reshape(-1, 28, 28)  # [N, 28, 28]
    labels = _read_idx(label_file, "labels").astype(np.int64)  # [N]
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {root}")
    return images, labels


def with_article(noun: str) -> str:
    """ "sneaker" -> "a sneaker", "ankle boot" -> "an ankle boot" (by the sound of the first word)."""
    word = noun.strip().lower()
    if not word:
        raise ValueError("with_article needs a non-empty noun")
    if word.startswith(_AN_DESPITE_CONSONANT):
        return f"an {noun}"
    if word.startswith(_A_DESPITE_VOWEL):
        return f"a {noun}"
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {noun}"


def fashion_mnist_caption(label: int) -> str:
    """The caption of a Fashion-MNIST class index, e.g. 9 -> "a photo of an ankle boot"."""
    if not 0 <= label < len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST label {label} is outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return f"a photo of {with_article(FASHION_MNIST_CLASSES[label])}"
