#!/usr/bin/env python
"""Plot training curves from one or more runs' metrics.jsonl into a PNG.

    python tools/plot_metrics.py runs/a runs/b --keys loss_gen rep_cos --out curves.png

Each argument is a run directory or a metrics.jsonl file; one panel per key, one line per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from selfflow.configs.extras import check, reports_missing_extras
from selfflow.data.atomic import atomic_path
from selfflow.training.metrics_file import read_metrics  # JSON only: no torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot() -> ModuleType:
    """matplotlib.pyplot with the Agg backend, imported on first use (not for --help)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metrics_file(path: Path) -> Path:
    found = path / "metrics.jsonl" if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    return found


def plot(runs: list[Path], keys: list[str], out: Path) -> Path:
    """One panel per key (metric vs step), one line per run; written atomically to `out`."""
    fig, axes = _pyplot().subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for run in runs:
        rows = read_metrics(metrics_file(run))
        label = run.name if run.is_dir() else run.parent.name
        for ax, key in zip(axes[0], keys, strict=True):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=label)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.startswith("loss"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out)


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out, write `path` as PNG atomically (a rename, never a half-written file), and close `fig`."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        _pyplot().close(fig)
    return path


@reports_missing_extras("selfflow-plot-metrics")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    p.add_argument("--keys", nargs="+", default=["loss", "loss_gen", "rep_cos"])
    p.add_argument("--out", type=Path, default=Path("curves.png"))
    args = p.parse_args(argv)
    check("tools")
    try:
        print(plot(args.runs, args.keys, args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
