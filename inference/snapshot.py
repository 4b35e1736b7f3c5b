"""Snapshots: what inference loads, laid out as a Hugging Face model folder (format 2):

    README.md                        the model card (inference/hub.py `render_model_card`)
    snapshot.json                    {"format": 2, "dtype", "step", "source", "files": {path: sha256}}
                                     (every file but the card)
    config.yaml                      the resolved training config (clip spec, text, codecs, sampler)
    transformer/config.json          MMDiT's constructor argument {"params": ...}: `MMDiT.from_pretrained`
    transformer/model.safetensors    the EMA weights (float16 by default, loaded back as float32)
    scheduler/scheduler_config.json  a diffusers FlowMatchEulerDiscreteScheduler that reproduces our Euler
                                     schedule at the config's sample shift (inference/hub.py)
    codecs/<modality>/               the run's diffusers autoencoders (config.json + weights), when it has
                                     any; config.yaml names them relative to the folder

`export_snapshot` makes one from a training checkpoint; `check_snapshot` compares every file with its
sha256 in snapshot.json before anything is trusted, so a damaged or swapped file is an error, not a
silently different model, and checks that transformer/config.json describes the model config.yaml
builds. Nothing is unpickled: safetensors, JSON and YAML only. Format 1 (model.safetensors, config.json
and snapshot.json at the top) still loads. The default model that ships with the package is the
snapshot in `assets/default/` (MODEL_CARD.md); the sampling commands use it when no --model is given.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from selfflow.configs.factory import model_params
from selfflow.configs.schema import Config, config_to_dict, load_config, save_config
from selfflow.data.atomic import usual_permissions
from selfflow.data.shards import sha256_file
from selfflow.inference.hub import TRANSFORMER, CardInfo, render_model_card, write_scheduler_config
from selfflow.inference.weights import load_weights, resolve_checkpoint
from selfflow.models.mmdit import MMDiT, MMDiTParams
from selfflow.tokenizers.codecs import WEIGHT_SUFFIXES
from selfflow.tokenizers.spec import MODALITIES

INFO, CONFIG, CARD = "snapshot.json", "config.yaml", "README.md"
WEIGHTS = f"{TRANSFORMER}/model.safetensors"
FORMAT = 2
V1_WEIGHTS, V1_CONFIG = "model.safetensors", "config.json"  # format 1, still read
DEFAULT_SNAPSHOT = Path(__file__).resolve().parent.parent / "assets" / "default"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUNTIME_FIELDS = ("attn_backend", "grad_checkpointing")  # how to run, not what the model is


@dataclasses.dataclass
class CardText:
    """What the exporter cannot know: what the data was, metrics measured elsewhere, known limits."""

    title: str = "Self-Flow MMDiT"
    data: str = ""
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    limitations: str = ""


def is_snapshot(path: str | Path) -> bool:
    return (Path(path) / INFO).is_file()


def export_snapshot(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "float16",
    weights: str = "ema",
    card: CardText | None = None,
) -> Path:
    """Checkpoint (or run dir) -> model folder `out`, written beside it and renamed into place."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    _check_replaceable(out)
    cfg = load_config(ckpt / "config.yaml")
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in load_weights(ckpt, weights).items()}
    step = json.loads((ckpt / "state.json").read_text()).get("step")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        params = _save_transformer(tmp, cfg, state)
        _copy_codecs(cfg, tmp, DTYPES[dtype])  # points cfg.codecs at the copies
        save_config(cfg, tmp / CONFIG)
        write_scheduler_config(tmp, cfg.sample.shift, cfg.sample.steps)
        text = card or CardText()
        count = sum(v.numel() for v in state.values())
        info = CardInfo(
            params, count, config_to_dict(cfg), text.title, text.data, text.metrics, text.limitations
        )
        (tmp / CARD).write_text(render_model_card(dataclasses.replace(info, folder=out.name, step=step)))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        files.pop(CARD)  # documentation: editing the card before publishing it changes no model
        record = {"format": FORMAT, "dtype": dtype, "step": step, "source": f"{ckpt.name} ({weights})"}
        (tmp / INFO).write_text(json.dumps({**record, "files": files}, indent=2) + "\n")
        usual_permissions(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_transformer(folder: Path, cfg: Config, state: dict[str, Tensor]) -> MMDiTParams:
    """transformer/ through the Hugging Face mixin: the model is built on the meta device and takes the
    exported tensors as its own (no copy), so even the 4B model needs no second set of weights."""
    params = dataclasses.replace(model_params(cfg), attn_backend="sdpa", grad_checkpointing=False)
    with torch.device("meta"):
        model = MMDiT(params)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(folder / TRANSFORMER)
    (folder / TRANSFORMER / CARD).unlink(missing_ok=True)  # the folder's one card is README.md at the top
    return params


def _check_replaceable(out: Path) -> None:
    """An export replaces only an earlier model folder (it has snapshot.json) or an empty folder: never
    a file, or a folder of something else that `--out` named by mistake."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and ((out / INFO).is_file() or not any(out.iterdir())):
        return
    raise ValueError(
        f"{out} exists and is not a model folder (no {INFO}): not replacing it; remove it or choose "
        "another --out"
    )


def _replace(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`, replacing a previous export only once this one is whole."""
    old = out.with_name(f".old-{out.name}")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _copy_codecs(cfg: Config, out: Path, dtype: torch.dtype) -> None:
    """Copy the run's autoencoder folders (top-level config and weight files; safetensors weights in
    `dtype`, which the codec loads back as float32) into `out/codecs/` and point `cfg.codecs` at them,
    relative to the snapshot. A codec serving two modalities is stored once."""
    placed: dict[Path, Path] = {}  # source folder -> its copy
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
        placed[Path(source).resolve()] = folder
        setattr(cfg.codecs, modality, str(folder))


def snapshot_weights(path: str | Path) -> Path:
    """The transformer's safetensors file of a snapshot (either format)."""
    info = json.loads((Path(path) / INFO).read_text())
    return Path(path) / (V1_WEIGHTS if info.get("format") == 1 else WEIGHTS)


def check_snapshot(path: str | Path) -> tuple[Config, dict[str, Any]]:
    """(config, snapshot.json) once every file matches its sha256 and, in format 2, the transformer's
    config.json matches the model config.yaml describes; codec folders are resolved against `path`."""
    path = Path(path)
    info = json.loads((path / INFO).read_text())
    if info.get("format") not in (1, FORMAT):
        raise ValueError(f"{path}: snapshot format {info.get('format')!r}, expected 1 or {FORMAT}")
    config = V1_CONFIG if info["format"] == 1 else CONFIG
    digests = dict(info.get("files", {}))
    if info["format"] == 1:  # the weights' digest, then the codecs'
        digests = {V1_WEIGHTS: info.get("sha256"), **info.get("codecs", {})}
    else:  # everything loading reads must be pinned (a hand-edited or partial snapshot.json is not)
        used = {WEIGHTS, CONFIG, f"{TRANSFORMER}/config.json"}
        used |= {str(p.relative_to(path)) for p in (path / "codecs").rglob("*") if p.is_file()}
        unpinned = sorted(used - set(digests))
        if unpinned:
            raise ValueError(f"{path}: {INFO} has no sha256 for {', '.join(unpinned)}")
    for name in (snapshot_weights(path).relative_to(path), config):
        if not (path / name).is_file():
            raise FileNotFoundError(f"snapshot {path} has no {name}")
    for name, digest in digests.items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise ValueError(f"{path}: {name} is missing or does not match its sha256 in {INFO}")
    cfg = load_config(path / config)
    if info["format"] == FORMAT:
        _check_params(path, cfg)
    for modality in MODALITIES:
        source = getattr(cfg.codecs, modality)
        if source != "identity" and not Path(source).is_absolute():
            setattr(cfg.codecs, modality, str(path / source))
    return cfg, info


def _check_params(path: Path, cfg: Config) -> None:
    saved = json.loads((path / TRANSFORMER / "config.json").read_text()).get("params")
    built = dataclasses.asdict(model_params(cfg))
    try:
        saved = dataclasses.asdict(MMDiTParams.from_json(saved))
    except ValueError as e:
        raise ValueError(f"{path}: {TRANSFORMER}/config.json: {e}") from None
    differ = sorted(k for k in built if k not in RUNTIME_FIELDS and saved.get(k) != built[k])
    if differ:
        raise ValueError(f"{path}: {TRANSFORMER}/config.json and {CONFIG} describe other models ({differ})")


def read_snapshot(path: str | Path) -> tuple[Config, dict[str, Tensor], dict[str, Any]]:
    """(config, float32 weights, snapshot.json) after checking the files' sha256."""
    cfg, info = check_snapshot(path)
    state = {k: v.float() for k, v in load_file(str(snapshot_weights(path))).items()}
    return cfg, state, info
