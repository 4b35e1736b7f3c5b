"""Tables and curves of the convergence benchmark (tools/benchmark.py): evaluations of every run ->
means over seeds per objective and step, the final-step table, steps-to-reach, results.md and PNG curves.

    curves = aggregate(runs)                     # {objective: {metric: {"steps", "mean", "std", "n"}}}
    reach = steps_to_reach(curves, "kid")        # first step each objective matches vanilla's final KID
    write_outputs(out_dir, results)              # results.json, results.md, curve_<metric>.png

A run is {"objective", "seed", "evals": [{"step": s, metric: value, ...}], "rep_cos": [[step, value]]};
a metric that was not measured is absent or None and is left out of its means.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from selfflow.data.atomic import write_atomic  # noqa: E402
from selfflow.tools.plot_metrics import save_figure  # noqa: E402

# metric -> (label, lower is better); the order of the table's columns and of the PNGs
METRICS: dict[str, tuple[str, bool]] = {
    "kid": ("KID (Inception)", True),
    "fid": ("FID (Inception)", True),
    "kid_rand": ("KID (random CNN)", True),
    "fid_rand": ("FD (random CNN)", True),
    "val_loss": ("validation loss", True),
    "probe_linear": ("linear probe acc.", False),
    "probe_knn": ("k-NN probe acc.", False),
}
REACH_METRICS = ("kid", "kid_rand")  # steps-to-reach is computed for these
REFERENCE = "vanilla"
TEACHER_OBJECTIVES = ("self_flow", "sra")  # the rep_cos curve: student-teacher cosine


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, std over seeds); std is the sample std (ddof 1), 0 for one value."""
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _mean_curve(points: dict[int, list[float]]) -> dict[str, list]:
    steps = sorted(points)
    stats = [_stats(points[s]) for s in steps]
    return {
        "steps": steps,
        "mean": [m for m, _ in stats],
        "std": [s for _, s in stats],
        "n": [len(points[s]) for s in steps],
    }


def aggregate(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, list]]]:
    """Per objective and metric, the mean / std over seeds at every evaluated step (and `rep_cos` from
    the training logs); a (step, metric) is averaged over the seeds that have a finite value there."""
    points: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run in runs.values():
        per_metric = points.setdefault(run["objective"], {})
        rows = [(e["step"], k, v) for e in run["evals"] for k, v in e.items() if k in METRICS]
        rows += [(step, "rep_cos", v) for step, v in run.get("rep_cos", [])]
        for step, key, value in rows:
            if isinstance(value, int | float) and math.isfinite(value):
                per_metric.setdefault(key, {}).setdefault(int(step), []).append(float(value))
    return {obj: {k: _mean_curve(p) for k, p in m.items()} for obj, m in points.items()}


def final_values(curves: dict[str, dict[str, dict]], step: int) -> dict[str, dict[str, dict]]:
    """{objective: {metric: {"mean", "std", "n"}}} at `step` (rep_cos: its last logged value)."""
    out: dict[str, dict[str, dict]] = {}
    for obj, per_metric in curves.items():
        out[obj] = {}
        for key, c in per_metric.items():
            if key == "rep_cos":
                at = len(c["steps"]) - 1
            elif step in c["steps"]:
                at = c["steps"].index(step)
            else:
                continue
            out[obj][key] = {"mean": c["mean"][at], "std": c["std"][at], "n": c["n"][at]}
    return out


def steps_to_reach(
    curves: dict[str, dict[str, dict]], metric: str = "kid", reference: str = REFERENCE
) -> dict[str, Any]:
    """{"metric", "reference", "target", "steps": {objective: step | None}}: the target is the reference
    objective's mean at its last evaluated step; an objective reaches it at its first evaluated step whose
    mean is at least as good (<= for lower-is-better metrics). None: never, or no reference to match."""
    lower = METRICS[metric][1]
    ref = curves.get(reference, {}).get(metric)
    target = ref["mean"][-1] if ref and ref["mean"] else None
    steps: dict[str, int | None] = {}
    for obj, per_metric in curves.items():
        c = per_metric.get(metric)
        hit = None
        if target is not None and c:
            for step, value in zip(c["steps"], c["mean"], strict=True):
                if (value <= target) if lower else (value >= target):
                    hit = step
                    break
        steps[obj] = hit
    return {"metric": metric, "reference": reference, "target": target, "steps": steps}


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    if entry["n"] > 1:
        return f"{entry['mean']:.4g} ± {entry['std']:.2g}"
    return f"{entry['mean']:.4g}"


def markdown(results: dict[str, Any]) -> str:
    """results.md: what was run, the final-step table, steps-to-reach, and how to read it."""
    final, objectives = results["final"], results["objectives"]
    shown = [k for k in (*METRICS, "rep_cos") if any(k in final.get(o, {}) for o in objectives)]
    label = {**{k: v[0] for k, v in METRICS.items()}, "rep_cos": "rep_cos (last log)"}
    reach_cols = [f"steps to {REFERENCE}'s final {label[m]}" for m in REACH_METRICS]
    head = ["objective", *(label[k] for k in shown), *reach_cols]
    lines = [
        f"# Convergence benchmark: preset `{results['preset']}`, {results['steps']} steps",
        "",
        f"Seeds {results['seeds']}, evaluated every {results['eval_every']} steps (EMA weights); "
        f"values at step {results['steps']}"
        + (", mean ± std over seeds." if len(results["seeds"]) > 1 else "."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for obj in objectives:
        cells = [_cell(final.get(obj, {}).get(k)) for k in shown]
        reach = [results["steps_to_reach"][m]["steps"].get(obj) for m in REACH_METRICS]
        cells += ["never" if r is None else str(r) for r in reach]
        lines.append("| " + " | ".join([f"`{obj}`", *cells]) + " |")
    ref = results.get("reference", {})
    if ref:
        floor = ", ".join(
            f"{label[k]} {v:.4g}" for k, v in ref.items() if k in label and isinstance(v, float)
        )
        lines += ["", f"Real-data floor at this n (train-split items vs the same test items): {floor}."]
    lines += ["", *results["notes"], ""]
    return "\n".join(lines)


def plot_curve(
    curves: dict[str, dict[str, dict]], metric: str, title: str, path: Path, floor: float | None = None
) -> Path | None:
    """metric vs step, one line per objective (a band of ±1 std when there are several seeds), and the
    real-data floor as a dashed line when given."""
    lines = {obj: m[metric] for obj, m in curves.items() if metric in m and m[metric]["steps"]}
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for obj, c in lines.items():
        steps, mean, std = (np.asarray(c[k], np.float64) for k in ("steps", "mean", "std"))
        ax.plot(steps, mean, marker="o", markersize=3, label=obj)
        if (std > 0).any():
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label="real data")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_outputs(out_dir: Path, results: dict[str, Any]) -> list[Path]:
    """results.json, results.md and one curve_<metric>.png per measured metric, each written atomically."""
    written = [write_atomic(out_dir / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")]
    written.append(write_atomic(out_dir / "results.md", markdown(results)))
    curves = results["curves"]
    teacher = {o: c for o, c in curves.items() if o in TEACHER_OBJECTIVES}
    for metric, (label, _) in METRICS.items():
        floor = results.get("reference", {}).get(metric)
        written.append(plot_curve(curves, metric, label, out_dir / f"curve_{metric}.png", floor))
    written.append(
        plot_curve(teacher, "rep_cos", "student-teacher cosine (training log)", out_dir / "curve_rep_cos.png")
    )
    return [p for p in written if p is not None]
