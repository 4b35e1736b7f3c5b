"""Snapshots: what inference loads. A folder with the EMA weights, the resolved config and a digest:

    model.safetensors   EMA weights (float16 by default: half the bytes, loaded back as float32)
    config.json         the resolved training config
    snapshot.json       {"format": 1, "sha256": <of model.safetensors>, "dtype", "step", "source",
                         "codecs": {<file>: <sha256>}}
    codecs/<modality>/  the run's diffusers autoencoders (config.json + weights), when it has any; the
                        config names them relative to the snapshot (`codecs.video: codecs/video`)

`export_snapshot` makes one from a training checkpoint; `read_snapshot` checks the digest before it
trusts the weights, so a damaged or swapped file is an error, not a silently different model. Nothing
is unpickled: safetensors and JSON only. The default model that ships with the package is the
snapshot in `assets/default/` (see MODEL_CARD.md); the sampling CLIs use it when no --ckpt is given.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from selfflow.configs.schema import Config, config_to_dict, load_config
from selfflow.data.atomic import usual_permissions
from selfflow.data.shards import sha256_file
from selfflow.inference.weights import load_weights, resolve_checkpoint
from selfflow.tokenizers.codecs import WEIGHT_SUFFIXES
from selfflow.tokenizers.spec import MODALITIES

WEIGHTS, CONFIG, INFO = "model.safetensors", "config.json", "snapshot.json"
FORMAT = 1
DEFAULT_SNAPSHOT = Path(__file__).resolve().parent.parent / "assets" / "default"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_snapshot(path: str | Path) -> bool:
    return (Path(path) / INFO).is_file()


def export_snapshot(ckpt: str | Path, out: str | Path, dtype: str = "float16", weights: str = "ema") -> Path:
    """Checkpoint (or run dir) -> snapshot folder `out`, written beside it and renamed into place."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    cfg = load_config(ckpt / "config.yaml")
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in load_weights(ckpt, weights).items()}
    step = json.loads((ckpt / "state.json").read_text()).get("step")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        save_file(state, str(tmp / WEIGHTS))
        codecs = _copy_codecs(cfg, tmp, DTYPES[dtype])
        (tmp / CONFIG).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        info = {"format": FORMAT, "sha256": sha256_file(tmp / WEIGHTS), "dtype": dtype, "step": step}
        info |= {"codecs": codecs} if codecs else {}
        (tmp / INFO).write_text(json.dumps({**info, "source": f"{ckpt.name} ({weights})"}, indent=2) + "\n")
        usual_permissions(tmp)
        old = out.with_name(f".old-{out.name}")  # replace a previous export only once this one is whole
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_codecs(cfg: Config, out: Path, dtype: torch.dtype) -> dict[str, str]:
    """Copy the run's autoencoder folders (top-level config and weight files; safetensors weights in
    `dtype`, which the codec loads back as float32) into `out/codecs/`, point `cfg.codecs` at them
    relative to the snapshot, and return {file: sha256} of what was copied."""
    copied: dict[str, str] = {}
    placed: dict[Path, Path] = {}  # source folder -> its copy: a codec serving two modalities is stored once
    for modality in MODALITIES:
        source = getattr(cfg.codecs, modality)
        if source == "identity":
            continue
        if Path(source).resolve() in placed:
            setattr(cfg.codecs, modality, str(placed[Path(source).resolve()]))
            continue
        folder = Path("codecs") / modality
        (out / folder).mkdir(parents=True)
        files = [p for p in Path(source).glob("*") if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES]
        if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
            raise FileNotFoundError(f"codecs.{modality}={source} has no weights to put in the snapshot")
        for file in files:
            if file.suffix == ".safetensors":
                tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(file).items()}
                save_file(tensors, str(out / folder / file.name), metadata={"format": "pt"})
            else:
                shutil.copyfile(file, out / folder / file.name)
            copied[str(folder / file.name)] = sha256_file(out / folder / file.name)
        placed[Path(source).resolve()] = folder
        setattr(cfg.codecs, modality, str(folder))
    return copied


def check_snapshot(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, snapshot.json) once the files are there and the weights (the model's and the codecs')
    match their sha256; the codec folders of the config are resolved against the snapshot."""
    path = Path(path)
    info = json.loads((path / INFO).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: snapshot format {info.get('format')!r}, expected {FORMAT}")
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"snapshot {path} has no {name}")
    if sha256_file(path / WEIGHTS) != info.get("sha256"):
        raise ValueError(f"{path}: {WEIGHTS} does not match the sha256 in {INFO} (damaged or replaced)")
    for name, digest in info.get("codecs", {}).items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise ValueError(f"{path}: {name} is missing or does not match its sha256 in {INFO}")
    cfg = load_config(path / CONFIG)
    for modality in MODALITIES:
        source = getattr(cfg.codecs, modality)
        if source != "identity" and not Path(source).is_absolute():
            setattr(cfg.codecs, modality, str(path / source))
    return cfg, info


def read_snapshot(path: str | Path) -> tuple[Config, dict[str, Tensor], dict[str, Any]]:
    """(config, float32 weights, snapshot.json) after checking the weights' sha256."""
    cfg, info = check_snapshot(path)
    state = {k: v.float() for k, v in load_file(str(Path(path) / WEIGHTS)).items()}
    return cfg, state, info
