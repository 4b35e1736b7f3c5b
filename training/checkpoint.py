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
        dcp/                    dist.engine=fsdp: every rank's shards of the student, head, EMA(s) and
                                optimizer (torch.distributed.checkpoint; reloads into any process count)
        manifest.json           every other file (dcp/ included) with its size in bytes (written last)

Publishing. A checkpoint is written into a hidden temporary directory, every file is fsynced, then
`manifest.json` (fsynced), then the directory itself; it is renamed to its final name and the parent is
fsynced; then `latest` is replaced durably (temporary file, fsync, rename, fsync); only then are older
checkpoints pruned (`keep_last`). A crash at any point leaves the previous checkpoints intact and at
most a `.tmp-*` folder that loading ignores and the next save removes. With several processes every
rank writes and fsyncs its own files in one temporary directory; after a barrier rank 0 writes the
manifest over all ranks' files and publishes (`save_checkpoint_ranks`).

Completeness. A checkpoint is complete when its manifest exists and every file it lists is present with
the listed size (`check_checkpoint` says why not). That catches what a rename cannot: a disk that lost
or truncated a file after a power cut, a full disk, a partial copy. Resuming takes the newest complete
checkpoint and reports the newer ones it skipped (`scan_checkpoints`); `latest` is kept for people and
tools. Weights are safetensors and state JSON: loading unpickles nothing, and a file that still fails
to load is a `CheckpointError` naming it.
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
from safetensors.torch import save_file
from torch import Tensor

from selfflow.configs.schema import Config, save_config
from selfflow.data.atomic import fsync_dir, fsync_file, usual_permissions, write_atomic
from selfflow.inference.weights import (
    LATEST,
    MANIFEST,
    PREFIX,
    _load_json,
    _load_tensors,
)
from selfflow.inference.weights import (  # the read side, re-exported for training's callers
    CheckpointError as CheckpointError,
)
from selfflow.inference.weights import (
    check_checkpoint as check_checkpoint,
)
from selfflow.inference.weights import (
    has_checkpoints as has_checkpoints,
)
from selfflow.inference.weights import (
    is_complete as is_complete,
)
from selfflow.inference.weights import (
    latest_checkpoint as latest_checkpoint,
)
from selfflow.inference.weights import (
    list_checkpoints as list_checkpoints,
)
from selfflow.inference.weights import (
    load_weights as load_weights,
)
from selfflow.inference.weights import (
    resolve_checkpoint as resolve_checkpoint,
)
from selfflow.inference.weights import (
    scan_checkpoints as scan_checkpoints,
)


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
        _sync_files(_write_main(tmp, weights, trainer, {**state, "step": step}, cfg))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest_and_prune(root, final, keep_last)
    return final


def _sync_files(paths: list[Path]) -> None:
    for path in paths:
        fsync_file(path)


def write_manifest(folder: Path) -> Path:
    """`manifest.json` listing every other file of `folder` with its size, fsynced. The files must be
    fsynced already: the manifest vouches for what is on the disk."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size} for p in found}
    path = folder / MANIFEST
    with path.open("w") as f:
        f.write(json.dumps({"format": 1, "files": files}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Manifest, permissions, fsync of the folder, rename into place, fsync of the parent."""
    for sub in [p for p in tmp.rglob("*") if p.is_dir()]:  # dcp/ (FSDP2): its entries, then itself
        usual_permissions(sub)
        fsync_dir(sub)
    write_manifest(tmp)
    usual_permissions(tmp)
    fsync_dir(tmp)
    if final.exists():  # a rerun of the same step replaces the old copy (complete or not)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    fsync_dir(final.parent.parent)  # the run dir's entry for checkpoints/, new at the first save


def _point_latest_and_prune(root: Path, final: Path, keep_last: int) -> None:
    """`latest` -> final, durably; only then may older checkpoints go."""
    write_atomic(root / LATEST, final.name + "\n", durable=True)
    prune(root, keep_last, protect=final)  # keep_last=0 keeps every checkpoint but still drops temps


def _write_main(
    tmp: Path,
    weights: dict[str, dict[str, Tensor]],
    trainer: dict[str, Any],
    state: dict[str, Any],
    cfg: Config,
) -> list[Path]:
    """The files rank 0 (or the only process) writes; returns their paths."""
    for name, tensors in weights.items():
        save_file(_tensors(tensors), str(tmp / f"{name}.safetensors"))
    torch.save(trainer, tmp / "trainer.pt")
    save_config(cfg, tmp / "config.yaml")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    return [tmp / f"{name}.safetensors" for name in weights] + [
        tmp / n for n in ("trainer.pt", "config.yaml", "state.json")
    ]


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
    shared: Callable[[Path], None] | None = None,
) -> Path:
    """Every rank calls this with its own `mine` = (tensors, JSON-able state); rank 0 also passes `main` =
    (weights, trainer, state, cfg) as for `save_checkpoint`. All ranks write into one agreed temporary
    directory, each fsyncing its own files; after a barrier rank 0 writes the manifest over every rank's
    files, renames the directory into place and then writes `latest`. `shared(tmp)`, when given, is a
    collective write every rank joins (FSDP2's sharded state, which fsyncs its own files)."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash of an earlier attempt at this step
        tmp.mkdir(parents=True)
    barrier()
    if shared is not None:
        shared(tmp)
    tensors_path, json_path = rank_files(tmp, rank)
    torch.save(mine[0], tensors_path)
    json_path.write_text(json.dumps(mine[1], indent=2))
    written = [tensors_path, json_path]
    if main is not None:
        weights, trainer, state, cfg = main
        written += _write_main(tmp, weights, trainer, {**state, "step": step}, cfg)
    _sync_files(written)  # every rank vouches for its own files before the barrier
    barrier()
    if rank == 0:
        _publish(tmp, final)
        _point_latest_and_prune(root, final, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all), never `protect`; drop
    stale temporary folders."""
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, trainer.pt) of a checkpoint; trainer.pt holds only tensors and plain containers."""
    ckpt = Path(ckpt)
    return _load_json(ckpt / "state.json"), _load_tensors(ckpt / "trainer.pt")


def load_rank(ckpt: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON state, tensors) that rank `rank` saved; FileNotFoundError when that rank wrote nothing."""
    tensors_path, json_path = rank_files(ckpt, rank)
    if not (tensors_path.is_file() and json_path.is_file()):
        raise FileNotFoundError(f"checkpoint {ckpt} has no files of rank {rank}")
    return _load_json(json_path), _load_tensors(tensors_path)
