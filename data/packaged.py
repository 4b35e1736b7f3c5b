"""Real data that ships inside system packages, readable offline.

Every source names the Debian package to install when its files are missing:
  Fashion-MNIST    `dataset-fashion-mnist`: 60k train + 10k test grey 28x28 images in 10 classes
  text fonts       `fonts-dejavu-core`, `fonts-liberation`, `fonts-noto-core` (whichever are installed)
  colour emoji     `fonts-noto-color-emoji`: NotoColorEmoji.ttf, a bitmap font drawn only at size 109
  human speech     `asterisk-core-sounds-en-wav`: one speaker's 8 kHz prompts; the file names are the
                   transcripts (digits/4.wav says "four")
  synthetic speech `flite`: a command-line TTS with several voices (the fallback for speech)
Captions are built with `with_article`.
"""

from __future__ import annotations

import functools
import gzip
import shutil
import subprocess
import tempfile
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


# ---------------------------------------------------------------------- fonts
FONT_ROOT = Path("/usr/share/fonts/truetype")
# Upright and italic faces of three font families; those installed are used, in this order.
TEXT_FONT_FILES = (
    "dejavu/DejaVuSans.ttf",
    "dejavu/DejaVuSans-Bold.ttf",
    "dejavu/DejaVuSansCondensed.ttf",
    "dejavu/DejaVuSansMono.ttf",
    "dejavu/DejaVuSerif.ttf",
    "dejavu/DejaVuSerif-Italic.ttf",
    "liberation/LiberationSans-Regular.ttf",
    "liberation/LiberationSans-Bold.ttf",
    "liberation/LiberationSansNarrow-Regular.ttf",
    "liberation/LiberationSerif-Regular.ttf",
    "liberation/LiberationSerif-BoldItalic.ttf",
    "liberation/LiberationMono-Regular.ttf",
    "noto/NotoSans-Regular.ttf",
    "noto/NotoSans-Italic.ttf",
    "noto/NotoSansDisplay-Bold.ttf",
    "noto/NotoSerif-Regular.ttf",
    "noto/NotoSerif-Bold.ttf",
    "noto/NotoSerifDisplay-Italic.ttf",
)
EMOJI_FONT = FONT_ROOT / "noto/NotoColorEmoji.ttf"


def text_fonts(root: str | Path = FONT_ROOT) -> tuple[Path, ...]:
    """The installed faces of TEXT_FONT_FILES (at least one, or FileNotFoundError)."""
    found = tuple(Path(root) / name for name in TEXT_FONT_FILES if (Path(root) / name).is_file())
    if not found:
        raise FileNotFoundError(
            f"no text font under {root}; install one with: apt-get install fonts-dejavu-core"
            " fonts-liberation fonts-noto-core"
        )
    return found


def emoji_font(path: str | Path = EMOJI_FONT) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"emoji font {path} not found; install it with: apt-get install fonts-noto-color-emoji"
        )
    return Path(path)


# ---------------------------------------------------------------------- speech
# Debian installs the prompts under the speaker's folder; an Asterisk install links them as "en".
ASTERISK_ROOTS = (
    Path("/usr/share/asterisk/sounds/en_US_f_Allison"),
    Path("/usr/share/asterisk/sounds/en"),
)
ASTERISK_VOICE = "asterisk-allison"
FLITE_VOICES = ("slt", "kal16", "awb", "rms")


def asterisk_prompt(name: str, roots: tuple[Path, ...] = ASTERISK_ROOTS) -> Path:
    """The wav of one prompt, e.g. "digits/4" (a female voice saying "four"), at 8 kHz."""
    for root in roots:
        path = root / f"{name}.wav"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Asterisk prompt {name}.wav not found under {roots[0]}; install it with:"
        " apt-get install asterisk-core-sounds-en-wav"
    )


def has_asterisk_prompts(roots: tuple[Path, ...] = ASTERISK_ROOTS) -> bool:
    return any((root / "digits" / "0.wav").is_file() for root in roots)


@functools.lru_cache(maxsize=256)
def flite_wav(text: str, voice: str) -> bytes:
    """A wav file of flite speaking `text` (16 kHz for every voice but kal); same input, same bytes."""
    exe = shutil.which("flite")
    if exe is None:
        raise FileNotFoundError("flite not found; install it with: apt-get install flite")
    with tempfile.TemporaryDirectory(prefix="selfflow-flite-") as tmp:
        out = Path(tmp) / "speech.wav"
        done = subprocess.run([exe, "-voice", voice, "-t", text, "-o", str(out)], capture_output=True)
        if done.returncode != 0 or not out.is_file():
            raise OSError(f"flite failed on {text!r} with voice {voice}: {done.stderr.decode().strip()}")
        return out.read_bytes()
