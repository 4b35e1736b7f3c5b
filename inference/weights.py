"""Reading checkpoints that training wrote: find a complete one and load its safetensors.

The layout and how a checkpoint is published are described in `selfflow.training.checkpoint`, which
writes them; this module is the read side, which sampling needs without the training package.

Completeness. A checkpoint is complete when its manifest exists and every file it lists is present with
the listed size (`check_checkpoint` says why not). That catches what a rename cannot: a disk that lost
or truncated a file after a power cut, a full disk, a partial copy. Weights are safetensors and state
JSON: loading unpickles nothing, and a file that still fails to load is a `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

PREFIX = "step_"
LATEST = "latest"
MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "state.json", "config.yaml")


class CheckpointError(ValueError):
    """A checkpoint file that passed the size check but cannot be read (damaged contents)."""


def check_checkpoint(path: str | Path) -> str | None:
    """None when `path` is a complete checkpoint, else why not (one line, e.g. "model.safetensors is 0
    bytes, manifest says 123456"). Checkpoints written before manifests existed are judged by the old
    rule: the REQUIRED files are present and not empty."""
    path = Path(path)
    if not path.is_dir() or path.name.startswith("."):
        return "not a checkpoint directory"
    manifest = path / MANIFEST
    if not manifest.is_file():  # written by an earlier version: no manifest to check sizes against
        bad = [f for f in REQUIRED if not (path / f).is_file() or (path / f).stat().st_size == 0]
        return f"no {MANIFEST}, and {', '.join(bad)} missing or empty" if bad else None
    try:
        files = json.loads(manifest.read_text())["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing, manifest says {size} bytes"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, manifest says {size}"
    return None


def is_complete(path: Path) -> bool:
    return check_checkpoint(path) is None


def _step_dirs(root: Path) -> list[Path]:
    """Directories named like checkpoints (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    return [p for p in _step_dirs(Path(root)) if is_complete(p)]


def scan_checkpoints(root: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest complete checkpoint or None, "<name>: <reason>" for each newer one that is not)."""
    skipped = []
    for path in reversed(_step_dirs(Path(root))):
        reason = check_checkpoint(path)
        if reason is None:
            return path, skipped
        skipped.append(f"{path.name}: {reason}")
    return None, skipped


def has_checkpoints(root: str | Path) -> bool:
    """Whether a checkpoint was ever published under `root`: a step directory or a `latest` pointer."""
    return bool(_step_dirs(Path(root))) or (Path(root) / LATEST).is_file()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, else None (`latest` is not trusted over the manifests: a crash
    between publishing a checkpoint and updating `latest` leaves the pointer one behind)."""
    return scan_checkpoints(root)[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a `checkpoints/` directory or a run directory -> a complete checkpoint."""
    path = Path(path)
    reason = check_checkpoint(path)
    if reason is None:
        return path
    if (path / MANIFEST).is_file() or (path / "state.json").is_file():  # a checkpoint, damaged
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {reason}")
    skipped = []
    for root in (path / "checkpoints", path):
        found, why = scan_checkpoints(root)
        if found is not None:
            return found
        skipped += why
    detail = f"; skipped {'; '.join(skipped)}" if skipped else f" (expected {', '.join(REQUIRED)})"
    raise FileNotFoundError(f"no complete checkpoint at {path}{detail}")


# What reading a damaged file raises: safetensors' own error; torch.load's zip reader (RuntimeError),
# its weights-only unpickler (UnpicklingError), a short file (EOFError); JSON (ValueError).
_DAMAGED = (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError)


def _damaged(path: Path, e: BaseException) -> CheckpointError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(f"checkpoint file {path} is damaged: {first}")


def load_weights(ckpt: str | Path, name: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """One safetensors file of a checkpoint, e.g. name="ema"; CheckpointError when it is damaged."""
    path = Path(ckpt) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {path.name}")
    try:
        return load_file(str(path), device=str(device))
    except _DAMAGED as e:
        raise _damaged(path, e) from None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except _DAMAGED as e:
        raise _damaged(path, e) from None


def _load_tensors(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _DAMAGED as e:
        raise _damaged(path, e) from None
