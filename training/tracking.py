"""Training metrics: accumulated on the device every step, synced to the host only at log intervals,
then written to `<run.dir>/metrics.jsonl` (one JSON object per logged step, flat keys) and the
dashboards `train.trackers` lists (TensorBoard, Weights & Biases; grouped names: training/trackers.py).

Per logged step: the objective's metrics averaged over the interval (loss, loss_gen, loss_rep,
rep_cos, mask_frac, grad_norm), the velocity loss per t-bin (`loss_t0`...: equal-width bins of each
sample's base level t, t = 1 noise), throughput (samples_per_s, tokens_per_s), lr and samples seen.

Reading the file back, and repairing a torn last line before a resumed run appends, is
`training/metrics_file.py` (no torch, so plots and reports can read it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfflow.training.metrics_file import (  # re-exported: the loop and tools read them from here
    MetricsError as MetricsError,
)
from selfflow.training.metrics_file import read_metrics as read_metrics
from selfflow.training.metrics_file import truncate_after
from selfflow.training.trackers import Tracker, dashboard_scalars

ALWAYS = ("loss", "loss_gen", "loss_rep")  # present for every objective (0 where it has none)


class MetricMeter:
    """Sums of per-step batch metrics and per-t-bin velocity losses, kept as device tensors."""

    def __init__(self, t_bins: int, device: torch.device) -> None:
        self.t_bins, self.device = t_bins, device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.bin_sum = torch.zeros(self.t_bins, device=self.device, dtype=torch.float64)
        self.bin_count = torch.zeros(self.t_bins, device=self.device, dtype=torch.float64)
        self.samples = self.tokens = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, Tensor], t: Tensor, loss_gen: Tensor, tokens_per_sample: float) -> None:
        """metrics: scalar tensors; t [B] base levels; loss_gen [B] per-sample velocity loss. No sync."""
        for k, v in metrics.items():
            v = v.detach().double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        bins = (t.detach() * self.t_bins).long().clamp(0, self.t_bins - 1)  # [B]
        self.bin_sum.index_add_(0, bins, loss_gen.detach().double())
        self.bin_count.index_add_(0, bins, torch.ones_like(self.bin_sum[bins]))
        self.steps += 1
        self.samples += t.shape[0]
        self.tokens += t.shape[0] * tokens_per_sample

    def flush(self) -> dict[str, float]:
        """Interval means and throughput (one host sync), then reset."""
        names = list(self.sums)
        zero = self.bin_sum.new_zeros(0)
        sums = torch.stack([self.sums[k] for k in names]) if names else zero
        values = torch.cat([sums, self.bin_sum, self.bin_count]).tolist()  # the one host sync
        out = {k: v / max(self.steps, 1) for k, v in zip(names, values[: len(names)], strict=True)}
        bin_sum, bin_count = values[len(names) : len(names) + self.t_bins], values[len(names) + self.t_bins :]
        for k in ALWAYS:
            out.setdefault(k, 0.0)
        for i, (s, c) in enumerate(zip(bin_sum, bin_count, strict=True)):
            if c > 0:
                out[f"loss_t{i}"] = s / c
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out["samples_per_s"] = self.samples / elapsed
        out["tokens_per_s"] = self.tokens / elapsed
        self.reset()
        return out


class RunLogger:
    """Appends metrics to `<run_dir>/metrics.jsonl` and passes each metrics row (not the event rows) to
    the dashboards (training/trackers.py), which it closes on exit."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, trackers: Sequence[Tracker] = ()) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.trackers = list(trackers)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_after(self.path, resume_step)
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, step: int, values: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.trackers and "event" not in values:
            scalars = dashboard_scalars(values)
            for tracker in self.trackers:
                tracker.log(step, scalars)

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)
