#!/usr/bin/env python
"""Cold start of the commands: wall time of `--help` and of a first sample, as a user meets them.

    python tools/bench_startup.py [--repeats 5] [--root DIR] [--sample] [--out startup.json]

Each command runs in a fresh process (`python <script> --help`), `--repeats` times; the median is
reported. `--root` times another checkout of the project (e.g. an older commit in a git worktree): its
scripts run with that checkout first on the import path, so the two trees can be compared side by side
on one machine, in one run. `--sample` adds the time of `inference/sample_av.py` end to end on the
shipped model (one clip, the command's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (
    "training/main.py",
    "inference/sample_av.py",
    "inference/sample_image.py",
    "tools/make_shards.py",
    "tools/evaluate.py",
    "tools/export_snapshot.py",
    "tools/plot_metrics.py",
    "tools/model_info.py",
)


def _env(root: Path, link_dir: Path) -> dict[str, str]:
    """An environment whose `selfflow` package is the checkout at `root` (a symlink named selfflow)."""
    link = link_dir / "selfflow"
    if not link.exists():
        link.symlink_to(root.resolve(), target_is_directory=True)
    return {
        **os.environ,
        "PYTHONPATH": str(link_dir),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }


def _seconds(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def measure(root: Path, repeats: int, sample: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(root, Path(tmp))
        result = {}
        for script in COMMANDS:
            if (root / script).is_file():
                times = [_seconds([sys.executable, script, "--help"], env, root) for _ in range(repeats)]
                result[f"{script} --help"] = round(statistics.median(times), 3)
        if sample:
            out = Path(tmp) / "clip.mp4"
            cmd = [sys.executable, "inference/sample_av.py", "--prompt", "a ball bounces twice", "--quiet",
                   "--out", str(out)]  # fmt: skip
            result["inference/sample_av.py (one clip)"] = round(_seconds(cmd, env, root), 2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to time")
    p.add_argument("--sample", action="store_true", help="also one sample_av clip end to end")
    p.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    try:
        result = measure(args.root, args.repeats, args.sample)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps({"root": str(args.root), "seconds": result}, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
