"""Hugging Face interop: the diffusers scheduler that reproduces our Euler sampler.

A model folder (local, or a Hub repository with the same files) is laid out as

    README.md                           the model card
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

No training imports here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
