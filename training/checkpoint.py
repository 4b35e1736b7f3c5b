"""Checkpoints: one directory per step under `<run.dir>/checkpoints/`, published by rename.

    checkpoints/
      latest                    name of the newest complete checkpoint (written last)
      step_00000500/
        model.safetensors       the trained student
        head.safetensors        the objective's projector (self_flow, sra, repa)
        ema.safetensors         the evaluation EMA (and the teacher, unless a separate one is kept)
        ema_teacher.safetensors the faster teacher EMA (train.teacher_decay >= 0)
        trainer.pt              optimizer, scheduler and RNG states (loaded with weights_only=True)
        state.json              step, samples seen, EMA counters, ...
        config.yaml             the resolved config
        rank_00001.pt / .json   with several processes: each rank's RNG states (and its optimizer shard
                                under ZeRO) / data position and counters

A checkpoint is complete when its directory exists under its final name: it is written into a hidden
temporary directory first and renamed in one step, so a crash mid-save leaves only a `.tmp-*` folder
that loading ignores. Weights are safetensors and state JSON: loading unpickles nothing. With several
processes every rank writes its own files into one temporary directory; rank 0 publishes it by rename
and writes `latest` after all ranks are done (`save_checkpoint_ranks`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from selfflow.configs.schema import Config, save_config
from selfflow.data.atomic import usual_permissions, write_atomic

PREFIX = "step_"
LATEST = "latest"
REQUIRED = ("model.safetensors", "state.json", "config.yaml")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _tensors(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies (what safetensors needs)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}


def save_checkpoint(
    root: str | Path,
    step: int,
    weights: dict[str, dict[str, Tensor]],
    trainer: dict[str, Any],
    state: dict[str, Any],
    cfg: Config,
    keep_last: int = 0,
) -> Path:
    """Write `<root>/step_<step>/` with one safetensors file per entry of `weights` (e.g. "model",
    "ema"), `trainer.pt`, `state.json` and `config.yaml`; point `latest` at it; keep the newest
    `keep_last` checkpoints (0 keeps all). Returns the checkpoint directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        _write_main(tmp, weights, trainer, {**state, "step": step}, cfg)
        usual_permissions(tmp)
        if final.exists():  # a rerun of the same step replaces the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(root / LATEST, final.name + "\n")
    if keep_last > 0:
        prune(root, keep_last, protect=final)
    return final


def _write_main(
    tmp: Path,
    weights: dict[str, dict[str, Tensor]],
    trainer: dict[str, Any],
    state: dict[str, Any],
    cfg: Config,
) -> None:
    for name, tensors in weights.items():
        save_file(_tensors(tensors), str(tmp / f"{name}.safetensors"))
    torch.save(trainer, tmp / "trainer.pt")
    save_config(cfg, tmp / "config.yaml")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))


def rank_files(ckpt: str | Path, rank: int) -> tuple[Path, Path]:
    """(tensors loaded with weights_only=True, JSON) that rank `rank` wrote into a checkpoint."""
    stem = Path(ckpt) / f"rank_{rank:05d}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def save_checkpoint_ranks(
    root: str | Path,
    step: int,
    rank: int,
    barrier: Callable[[], None],
    main: tuple[dict[str, dict[str, Tensor]], dict[str, Any], dict[str, Any], Config] | None,
    mine: tuple[dict[str, Any], dict[str, Any]],
    keep_last: int = 0,
) -> Path:
    """Every rank calls this with its own `mine` = (tensors, JSON-able state); rank 0 also passes `main` =
    (weights, trainer, state, cfg) as for `save_checkpoint`. All ranks write into one agreed temporary
    directory; after a barrier rank 0 renames it into place and then writes `latest`."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash of an earlier attempt at this step
        tmp.mkdir(parents=True)
    barrier()
    tensors_path, json_path = rank_files(tmp, rank)
    torch.save(mine[0], tensors_path)
    json_path.write_text(json.dumps(mine[1], indent=2))
    if main is not None:
        weights, trainer, state, cfg = main
        _write_main(tmp, weights, trainer, {**state, "step": step}, cfg)
    barrier()
    if rank == 0:
        usual_permissions(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST, final.name + "\n")
        if keep_last > 0:
            prune(root, keep_last, protect=final)
    barrier()
    return final


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and all((path / f).is_file() for f in REQUIRED)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, never `protect`; drop stale temps."""
    for old in list_checkpoints(root)[:-keep_last]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a `checkpoints/` directory or a run directory -> a complete checkpoint."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at {path} (expected {', '.join(REQUIRED)})")


def load_weights(ckpt: str | Path, name: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """One safetensors file of a checkpoint, e.g. name="ema"."""
    path = Path(ckpt) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {path.name}")
    return load_file(str(path), device=str(device))


def load_state(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, trainer.pt) of a checkpoint; trainer.pt holds only tensors and plain containers."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    return state, trainer


def load_rank(ckpt: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON state, tensors) that rank `rank` saved; FileNotFoundError when that rank wrote nothing."""
    tensors_path, json_path = rank_files(ckpt, rank)
    if not (tensors_path.is_file() and json_path.is_file()):
        raise FileNotFoundError(f"checkpoint {ckpt} has no files of rank {rank}")
    state = json.loads(json_path.read_text())
    return state, torch.load(tensors_path, map_location="cpu", weights_only=True)
