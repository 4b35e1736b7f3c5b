"""Big-model loading (accelerate): build the model without allocating it, then stream the safetensors
weights onto the devices of a memory budget, block by block; what does not fit stays in CPU RAM or in
an offload folder on disk and is moved in for its forward only.

    model = load_dispatched(cfg, "snap/model.safetensors", max_memory={0: "20GiB", "cpu": "48GiB"})

For the `4b` preset this lets sampling run on a 24 GB card (bf16 weights, ~8 GB, fit whole; fp32 ones
spill to the CPU) or from CPU RAM alone. A transformer block is never split across devices.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

from selfflow.configs.factory import model_params
from selfflow.configs.schema import Config
from selfflow.models.mmdit import MMDiT

NO_SPLIT = ["DoubleStreamBlock", "SingleStreamBlock"]


def parse_max_memory(text: str) -> dict[int | str, str]:
    """ "0=20GiB,cpu=48GiB" -> {0: "20GiB", "cpu": "48GiB"} (GPU index, "cpu" or "disk" = size)."""
    budget: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+|cpu|disk)\s*=\s*(\d+(?:\.\d+)?\s*[KMGT]?i?B)", part, re.IGNORECASE)
        if match is None:
            raise ValueError(f"max memory {part!r} is not DEVICE=SIZE (e.g. 0=20GiB, cpu=48GiB)")
        device = match.group(1).lower()
        budget[int(device) if device.isdigit() else device] = match.group(2).replace(" ", "")
    if not budget:
        raise ValueError("max memory is empty: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=48GiB")
    return budget


def load_dispatched(
    cfg: Config,
    weights: str | Path,
    max_memory: dict[int | str, str],
    offload_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> MMDiT:
    """The model of `cfg` with `weights` (a safetensors file) spread over `max_memory`, in eval mode.
    The embeddings and input layers come first in the map, so they land on the first device."""
    with init_empty_weights():
        model = MMDiT(model_params(cfg))
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=dtype
    )
    if device_map.get("") == "disk" or next(iter(device_map.values())) == "disk":
        raise ValueError(f"max memory {max_memory} holds not even the model's input layers")
    if "disk" in device_map.values() and offload_dir is None:
        raise ValueError("the weights do not fit the memory budget: give an offload folder for the rest")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # per-tensor bars, notes
        warnings.simplefilter("ignore")
        model = load_checkpoint_and_dispatch(
            model, str(weights), device_map=device_map, offload_folder=offload_dir, dtype=dtype, strict=True
        )
    model.hf_device_map = device_map
    return model.eval()
