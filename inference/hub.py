"""Hugging Face interop: the diffusers scheduler that reproduces our Euler sampler, and the model card.

A model folder (local, or a Hub repository with the same files) is laid out as

    README.md                           render_model_card(...)
    transformer/config.json             MMDiT.save_pretrained: {"params": <MMDiTParams fields>}
    transformer/model.safetensors
    scheduler/scheduler_config.json     write_scheduler_config(folder, shift, steps)

Our sampler (`samplers.get_schedule`, `samplers.euler`) steps through the levels
shift_time(linspace(1, 0, steps + 1)) (SD3 Eq. 23). diffusers' FlowMatchEulerDiscreteScheduler shares
our conventions: sigma = t (1 = noise), and its step is x + (sigma_next - sigma) v with v = noise - data.
With `scheduler_config(shift, steps)` and the sigmas diffusers' own Flux / LTX pipelines pass,

    scheduler.set_timesteps(sigmas=scheduler_sigmas(steps))  # np.linspace(1.0, 1 / steps, steps)

its sigmas are our levels (to float32 rounding), and its model input `timestep / 1000` is our t.

Why not a plain `set_timesteps(num_inference_steps=steps)`: without sigmas the scheduler spaces the
unshifted levels linearly from 1 down to shift(1 / num_train_timesteps), not to 1 / steps, and then
shifts them. They are ours only when num_train_timesteps = shift * (steps - 1) + 1: an integer for few
shifts, a config valid for one step count, and timesteps no longer t * 1000 (which pipelines assume).

No training imports here: the model card takes the resolved config as a plain mapping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from selfflow.models.mmdit import HUB_TAGS, MMDiTParams

TRANSFORMER, SCHEDULER = "transformer", "scheduler"
SCHEDULER_FILE = "scheduler_config.json"
NUM_TRAIN_TIMESTEPS = 1000  # diffusers' timesteps are sigma * 1000; pipelines feed the model timestep / 1000
SAMPLER_KEY = "_selfflow_sampler"  # diffusers drops config keys that start with "_" without a warning


def scheduler_config(shift: float, steps: int) -> dict[str, Any]:
    """The scheduler_config.json of a diffusers FlowMatchEulerDiscreteScheduler that, set up with
    `set_timesteps(sigmas=scheduler_sigmas(steps))`, steps through `samplers.get_schedule(steps, shift)`.

    Every argument of the scheduler is written out (the values of diffusers 0.42), so that a change of
    its defaults cannot change the schedule. `steps` is not a scheduler setting: it is stored, with the
    shift, under "_selfflow_sampler" as the step count our sampler uses by default.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "shift": float(shift),  # applied by set_timesteps to the sigmas it is given (SD3 Eq. 23)
        "use_dynamic_shifting": False,  # resolution-dependent shifting would replace ours
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
        SAMPLER_KEY: {"sampler": "euler", "steps": steps, "shift": float(shift)},
    }


def scheduler_sigmas(steps: int) -> list[float]:
    """The `sigmas` for `scheduler.set_timesteps(sigmas=...)`: our levels before the shift, without the
    final 0 (the scheduler appends it), i.e. linspace(1, 1 / steps, steps). They depend on the step
    count only, since the scheduler applies the shift of its config itself."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return [1.0 - i / steps for i in range(steps)]


def write_scheduler_config(folder: str | Path, shift: float, steps: int) -> Path:
    """Write FOLDER/scheduler/scheduler_config.json; diffusers loads it with
    `FlowMatchEulerDiscreteScheduler.from_pretrained(FOLDER, subfolder="scheduler")`."""
    path = Path(folder) / SCHEDULER / SCHEDULER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scheduler_config(shift, steps), indent=2) + "\n")
    return path


@dataclass
class CardInfo:
    """What the model card says. `config` is the resolved training config as plain containers
    (`configs.schema.config_to_dict`, or a model folder's config.yaml); missing entries show as "n/a"."""

    params: MMDiTParams | Mapping[str, Any]  # the transformer's constructor argument
    num_params: int
    config: Mapping[str, Any]
    title: str = "Self-Flow MMDiT"
    data: str = ""  # free text: what the model was trained on, and its licences
    metrics: Mapping[str, Any] = field(default_factory=dict)  # metric name -> value
    limitations: str = ""
    folder: str = "path/to/model"  # how the sampling snippets name the folder (or a downloaded repo)
    step: int | None = None  # the optimizer steps the weights were trained for (None: train.max_steps)


def render_model_card(info: CardInfo) -> str:
    """A Hugging Face README.md: YAML front matter, then model, training recipe, data, evaluation,
    limitations and how to sample."""
    params = asdict(info.params) if is_dataclass(info.params) else dict(info.params)
    front = {
        "license": "apache-2.0",
        "library_name": "selfflow",
        "pipeline_tag": _pipeline_tag(params.get("media_channels", {})),
        "tags": list(HUB_TAGS),
    }
    metrics = _table(["metric", "value"], list(info.metrics.items())) if info.metrics else "None reported.\n"
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n",
        f"# {info.title}\n\nA multimodal flow-matching transformer (MMDiT) trained with Self-Flow. "
        "Convention: t = 0 is data, t = 1 is noise, the network predicts the velocity noise - data.\n",
        "## Model\n\n" + _table(["", ""], _model_rows(params, info.num_params)),
        "## Training recipe\n\n" + _recipe(info.config, info.step),
        "## Data\n\n" + (info.data.strip() or "Not documented.") + "\n",
        "## Evaluation\n\n" + metrics,
        "## Limitations\n\n" + (info.limitations.strip() or "Not documented.") + "\n",
        "## How to sample\n\n" + _how_to_sample(info.folder, info.config),
    ]
    return "\n".join(sections)


def _pipeline_tag(media_channels: Mapping[str, int]) -> str:
    """The closest Hub task: video if the model makes video, else images, else audio."""
    for modality, tag in (("video", "text-to-video"), ("image", "text-to-image"), ("audio", "text-to-audio")):
        if modality in media_channels:
            return tag
    return "text-to-video"


def _model_rows(p: Mapping[str, Any], num_params: int) -> list[tuple[str, Any]]:
    heads, hidden = p.get("num_heads"), p.get("hidden_size")
    head_dim = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else "n/a"
    text = (
        f"token ids, vocabulary {p['txt_vocab_size']}, embeddings learned from scratch"
        if p.get("txt_vocab_size")
        else f"features of a frozen text encoder, width {p.get('txt_feature_dim', 'n/a')}"
    )
    media = ", ".join(f"{m} {c}" for m, c in p.get("media_channels", {}).items())
    return [
        ("parameters", f"{num_params / 1e6:.1f}M ({num_params:,})"),
        (
            "architecture",
            f"MMDiT: hidden {hidden}, {heads} heads of {head_dim}, {p.get('depth_double')} double-stream + "
            f"{p.get('depth_single')} single-stream blocks, SwiGLU ratio {p.get('mlp_ratio')}",
        ),
        ("rotary axes (t, h, w, l)", f"{tuple(p.get('axes_dim', ()))}, theta {p.get('rope_theta')}"),
        ("media (values per token)", media or "n/a"),
        ("text", text),
        ("prediction", p.get("prediction", "velocity")),
    ]


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    """cfg["a"]["b"] for "a.b", or "n/a" when a level is missing."""
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return "n/a"
        node = node[key]
    return node


def _schedule(cfg: Mapping[str, Any]) -> str:
    """The lr after warm-up: "constant", "linear decay to 0", or with train.decay_steps "constant, then
    linear decay to 0 over the last N steps"."""
    name, last = _get(cfg, "train.schedule"), _get(cfg, "train.decay_steps")
    if name not in ("cosine", "linear"):
        return str(name)
    if last in (0, "n/a"):
        return f"{name} decay to 0"
    return f"constant, then {name} decay to 0 over the last {last} steps"


def _recipe(cfg: Mapping[str, Any], step: int | None = None) -> str:
    planned = _get(cfg, "train.max_steps")
    steps = planned if step is None or step == planned else f"{step} (the run was set for {planned})"
    gamma = _get(cfg, "objective.gamma")
    batch = (
        f"packed rows of {_get(cfg, 'data.tokens_per_batch')} tokens"
        if _get(cfg, "data.pack") is True
        else f"{_get(cfg, 'train.batch_size')} per process x {_get(cfg, 'train.grad_accum')} accumulation"
    )
    rows = [
        ("objective", f"{_get(cfg, 'objective.name')} (gamma {'default' if gamma == -1.0 else gamma})"),
        ("steps", steps),
        ("batch size", batch),
        (
            "optimizer",
            f"AdamW, lr {_get(cfg, 'train.lr')}, betas {_get(cfg, 'train.betas')}, weight decay "
            f"{_get(cfg, 'train.weight_decay')}, {_get(cfg, 'train.warmup_steps')} warm-up steps, then "
            f"{_schedule(cfg)}; grad clip {_get(cfg, 'train.grad_clip')}",
        ),
        ("EMA decay", _get(cfg, "train.ema_decay")),
        ("caption dropout (CFG)", _get(cfg, "objective.caption_dropout")),
    ]
    timesteps, masks = _get(cfg, "objective.timesteps"), _get(cfg, "objective.mask_ratio")
    tasks = timesteps if isinstance(timesteps, Mapping) else {}
    per_task = [(task, _timestep_dist(dist), _mask(masks, task)) for task, dist in tasks.items()]
    return _table(["", ""], rows) + "\n" + _table(["task", "p(t)", "mask ratio"], per_task)


def _timestep_dist(dist: Any) -> str:
    if not isinstance(dist, Mapping):
        return str(dist)
    kind, shift = dist.get("kind", "n/a"), dist.get("shift", 1.0)
    law = f"logit-normal(mu {dist.get('mu')}, sigma {dist.get('sigma')})" if kind == "logit_normal" else kind
    return law if shift == 1.0 else f"{law}, shift {shift}"


def _mask(masks: Any, task: str) -> Any:
    """The mask ratio a task's tokens get (an AV sample masks video and audio at their own ratios)."""
    if not isinstance(masks, Mapping):
        return "n/a"
    if task == "av":
        return ", ".join(f"{m} {masks[m]}" for m in ("video", "audio") if m in masks) or "n/a"
    return masks.get(task, "n/a")


def _how_to_sample(folder: str, cfg: Mapping[str, Any]) -> str:
    sampler, steps = _get(cfg, "sample.sampler"), _get(cfg, "sample.steps")
    shift, scale = _get(cfg, "sample.shift"), _get(cfg, "sample.cfg_scale")
    n = steps if isinstance(steps, int) and not isinstance(steps, bool) else 30  # the CLIs' default
    return f"""The folder holds `transformer/` (the MMDiT: config.json and model.safetensors) and
`scheduler/` (a diffusers scheduler config). With the `selfflow` package installed:

```bash
selfflow-sample-av --model {folder} --prompt "a ball bounces on the floor" --out clip.mp4
```

Training drew its samples with the {sampler} sampler, {steps} steps, shift {shift}, guidance scale {scale}.

```python
from selfflow.models.mmdit import MMDiT

FOLDER = "{folder}"
model = MMDiT.from_pretrained(FOLDER + "/transformer").eval()
print(model.params)  # the architecture
# out = model(media, media_ids, t, txt)  # t [B] in [0, 1] (1 = noise); out.velocity: modality -> [B, L, C]
```

Our Euler schedule with diffusers (feed the model t = timestep / 1000):

```python
from diffusers import FlowMatchEulerDiscreteScheduler
from selfflow.inference.hub import scheduler_sigmas

steps = {n}
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(FOLDER, subfolder="scheduler")
scheduler.set_timesteps(sigmas=scheduler_sigmas(steps))  # np.linspace(1.0, 1 / steps, steps)
```
"""


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
