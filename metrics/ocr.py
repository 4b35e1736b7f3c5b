"""Text-rendering scores: read each generated sign with tesseract and compare it to the intended word.

tesseract (Debian `tesseract-ocr` + `tesseract-ocr-eng`) is called as a program, one line of text per
image (`--psm 7`, LSTM engine `--oem 1`). Before reading, every image is normalised the same way:
  - converted to grey (signs are coloured; the benchmark's colour pairs differ in luminance),
  - made dark-on-light: the background is the median grey, and an image whose mean is brighter than its
    median has light text, so it is inverted,
  - stretched so that the background is white and the darkest ink black,
  - upscaled (bicubic) to at least UPSCALE_HEIGHT pixels tall, since tesseract is weak on tiny glyphs,
  - padded with a BORDER px white frame, so the text sits centred away from the edges.

    scores = ocr_scores(images, [meta["word"] for meta in metas])  # {"word_accuracy", "cer", "n"}

Scores are case-insensitive: a sign may write the word in upper, title or lower case. Many images are
read by one tesseract process (as pages of a list file), which costs ~0.01 s per image instead of ~0.3 s
for a process per image. Ground-truth signs of the text benchmark (412 each) read at word accuracy 0.993
at 32x128, 0.998 at 64x256, 0.998 at 32x64 and 0.978 at 16x64; random noise reads at 0.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

APT_PACKAGES = "tesseract-ocr tesseract-ocr-eng"
TESSERACT_ARGS = ("--psm", "7", "--oem", "1", "-l", "eng")
UPSCALE_HEIGHT = 64  # px: smaller images are enlarged to this height before reading
BORDER = 20  # px of white around the text
_TIMEOUT_S = 60


def tesseract_binary() -> str:
    """The path of the tesseract program (FileNotFoundError naming the apt packages if absent)."""
    path = shutil.which("tesseract")
    if path is None:
        raise FileNotFoundError(f"tesseract not found; install it with: apt-get install {APT_PACKAGES}")
    return path


def prepare(image: np.ndarray) -> np.ndarray:
    """The grey, dark-on-light, stretched, upscaled and padded uint8 [H', W'] that tesseract reads."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 image [H, W, 3] or [H, W], got {image.dtype} {image.shape}")
    grey_img = Image.fromarray(image).convert("L")
    grey = np.asarray(grey_img, np.float32)  # [H, W] in 0..255
    background = float(np.median(grey))
    if grey.mean() > background:  # the minority (text) is brighter than the background
        grey = 255.0 - grey
        background = 255.0 - background
    ink = float(np.percentile(grey, 1))
    if background - ink <= 1.0:  # less than 1 % ink: take the darkest pixel
        ink = float(grey.min())
    if background - ink > 1.0:
        grey = (grey - ink) / (background - ink) * 255.0  # ink -> 0, background -> 255
    else:
        grey = np.full_like(grey, 255.0)  # a flat image: nothing to read
    out = Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8))
    if out.height < UPSCALE_HEIGHT:
        scale = UPSCALE_HEIGHT / out.height
        out = out.resize((round(out.width * scale), UPSCALE_HEIGHT), Image.Resampling.BICUBIC)
    padded = np.full((out.height + 2 * BORDER, out.width + 2 * BORDER), 255, np.uint8)
    padded[BORDER : BORDER + out.height, BORDER : BORDER + out.width] = np.asarray(out)
    return padded


def _run_tesseract(pages: list[np.ndarray], workdir: Path) -> list[str]:
    """One tesseract process reads several prepared images, listed in a file, as pages of one document."""
    paths = [workdir / f"{i:06d}.png" for i in range(len(pages))]
    for page, path in zip(pages, paths, strict=True):
        Image.fromarray(page).save(path)
    listing = workdir / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one thread per process; callers run several
    proc = subprocess.run(
        [tesseract_binary(), str(listing), "stdout", *TESSERACT_ARGS],
        capture_output=True,
        env=env,
        timeout=_TIMEOUT_S + 2 * len(pages),
    )
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise RuntimeError(f"tesseract failed ({reason}); is {APT_PACKAGES} installed?")
    texts = proc.stdout.decode(errors="replace").split("\f")  # pages are separated by form feeds
    if len(texts) == len(pages) + 1 and not texts[-1].strip():
        texts = texts[:-1]
    if len(texts) != len(pages):
        raise RuntimeError(f"tesseract returned {len(texts)} pages for {len(pages)} images")
    return [" ".join(text.split()) for text in texts]


def read_texts(images: Sequence[np.ndarray], workers: int = 2, chunk: int = 256) -> list[str]:
    """The line of text in each RGB uint8 image [H, W, 3] (whitespace collapsed; "" for a flat image).

    Images go to tesseract in chunks of `chunk` pages per process (loading the model once per process is
    most of the cost of a single image), with up to `workers` processes at once.
    """
    tesseract_binary()  # fail once, early, if it is missing
    prepared = [prepare(image) for image in images]
    texts = [""] * len(prepared)
    todo = [i for i, p in enumerate(prepared) if p.min() < p.max()]  # a flat image has no text
    size = max(1, min(chunk, -(-len(todo) // max(1, workers))))  # pages per process
    chunks = [[prepared[i] for i in todo[k : k + size]] for k in range(0, len(todo), size)]
    with tempfile.TemporaryDirectory(prefix="selfflow-ocr-") as tmp:
        dirs = [Path(tmp) / f"chunk{k:05d}" for k in range(len(chunks))]
        for d in dirs:
            d.mkdir()
        with ThreadPoolExecutor(max(1, workers)) as pool:
            read = [text for part in pool.map(_run_tesseract, chunks, dirs) for text in part]
    for i, text in zip(todo, read, strict=True):
        texts[i] = text
    return texts


def read_text(image: np.ndarray) -> str:
    """The single line of text tesseract reads in an RGB uint8 image [H, W, 3] (whitespace collapsed)."""
    return read_texts([image], workers=1)[0]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def cer(pred: str, target: str) -> float:
    """Character error rate: levenshtein(pred, target) / len(target) (case-sensitive; can exceed 1)."""
    if not target:
        raise ValueError("cer needs a non-empty target")
    return levenshtein(pred, target) / len(target)


def ocr_scores(images: Sequence[np.ndarray], targets: Sequence[str], workers: int = 2) -> dict:
    """Word accuracy (exact match), mean CER and count of signs images[i] [H, W, 3] meant to say targets[i].

    Both scores ignore case and surrounding whitespace; `workers` tesseract processes run at once.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if len(images) == 0:
        raise ValueError("ocr_scores needs at least one image")
    preds = [p.strip().lower() for p in read_texts(images, workers=workers)]
    words = [t.strip().lower() for t in targets]
    return {
        "word_accuracy": float(np.mean([p == w for p, w in zip(preds, words, strict=True)])),
        "cer": float(np.mean([cer(p, w) for p, w in zip(preds, words, strict=True)])),
        "n": len(images),
    }
