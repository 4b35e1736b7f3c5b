"""Dashboards for the training metrics (`train.trackers`): TensorBoard and Weights & Biases, next to
`<run.dir>/metrics.jsonl`, which is always written (training/tracking.py; resume and the tools read it).

metrics.jsonl keeps flat keys (`loss`, `lr`, `samples_per_s`, ...); the dashboards show them grouped the
way diffusers / torchtitan users expect (`metric_name`, the one place the names are decided):
`train/loss`, `train/lr`, `train/loss_t0`, `throughput/tokens_per_s`, `data/samples_seen`,
`memory/<key less memory_>`, `val/<key less val_>`; a key without a group shows as `other/<key>`.

A tracker is imported only when `train.trackers` lists it: nothing here imports tensorboard or wandb at
module import. `check_trackers` fails at start-up, before training, when one is not installed.

Weights & Biases: project `train.wandb_project`, the run named after the run.dir folder, the resolved
config as its config; the run id is kept in `<run.dir>/wandb_id` so that a resumed run continues the
same wandb run (resume="allow"). Its files go under run.dir unless WANDB_DIR says otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from selfflow.configs.schema import ConfigError, config_to_dict
from selfflow.data.atomic import write_atomic

if TYPE_CHECKING:
    from selfflow.configs.schema import Config

TRAIN = ("loss", "loss_gen", "loss_rep", "rep_cos", "mask_frac", "grad_norm", "lr", "nonfinite_steps")
GROUPS = {  # metrics.jsonl key -> dashboard group
    **dict.fromkeys(TRAIN, "train"),
    **dict.fromkeys(("samples_per_s", "tokens_per_s"), "throughput"),
    **dict.fromkeys(("samples_seen", "skipped_samples"), "data"),
}
PREFIXES = {"samples_seen_": "data", "data_": "data", "memory_": "memory", "val_": "val"}
STRIPPED = ("data_", "memory_", "val_")  # the group says it: memory_peak_gib -> memory/peak_gib
INSTALL = {  # tracker -> (module, how to install it)
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'selfflow[trackers]'"),
}
WANDB_ID = "wandb_id"
STEP = "step"  # the x axis of the wandb charts: the training step


def metric_name(key: str) -> str:
    """The grouped name TensorBoard and wandb show for a metrics.jsonl key."""
    if key in GROUPS:
        return f"{GROUPS[key]}/{key}"
    if key.startswith("loss_t") and key[6:].isdigit():  # velocity loss per t-bin
        return f"train/{key}"
    for prefix, group in PREFIXES.items():
        if key.startswith(prefix):
            return f"{group}/{key.removeprefix(prefix) if prefix in STRIPPED else key}"
    return f"other/{key}"


def dashboard_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics row, under their grouped names."""
    return {
        metric_name(k): float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
    }


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def check_trackers(names: list[str]) -> None:
    """ConfigError, one line, when a listed tracker's package is not installed (before training)."""
    for name in names:
        module, hint = INSTALL.get(name, (None, ""))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.trackers lists {name}, which is not installed: {hint}")


def open_trackers(cfg: Config, resume_step: int) -> list[Tracker]:
    """The dashboards `train.trackers` lists (jsonl is the RunLogger's own file)."""
    check_trackers(cfg.train.trackers)
    opened: list[Tracker] = []
    try:
        for name in cfg.train.trackers:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(Path(cfg.run.dir), resume_step))
            elif name == "wandb":
                opened.append(WandbTracker(cfg))
    except BaseException:
        for tracker in opened:  # a later tracker failed to open: close the ones that did
            tracker.close(failed=True)
        raise
    return opened


class TensorBoardTracker:
    """Scalars under `<run_dir>/tb`; a resumed run drops the events logged after its checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run.dir: the one `<run_dir>/wandb_id` keeps, or a new one stored there."""
    path = run_dir / WANDB_ID
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    write_atomic(path, run_id + "\n", durable=True)
    return run_id


class WandbTracker:
    """One wandb run per run.dir, continued on resume; finished (failed when the run raised) on close.

    The training step is logged as the metric `step`, the x axis of every chart, and not as wandb's own
    step: wandb drops rows whose step is below one it has seen, so the steps a resumed run repeats
    after its checkpoint (a crash after the last save) would be lost. They are kept, at their step.
    """

    def __init__(self, cfg: Config) -> None:
        wandb = importlib.import_module("wandb")
        run_dir = Path(cfg.run.dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.train.wandb_project,
            entity=cfg.train.wandb_entity or None,
            name=run_dir.name,
            id=wandb_run_id(run_dir),
            resume="allow",
            config=config_to_dict(cfg),
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
        )
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, STEP: step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
