"""The benchmark's tasks by name and the command line their builders read (tools/make_benchmark.py).

`parse_args` fills the options a user leaves out from the task's `--size` preset; metrics/suite.py
calls it to build held-out items at a model's clip spec without going through the tool.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selfflow.data.benchmark import audio, avsync, classes, emoji, text, video
from selfflow.data.benchmark.common import SIZES, Task
from selfflow.data.benchmark.sound import VOICES

DESCRIPTION = "Build a captioned media folder from packaged real data (make_shards and evaluation input)."

TASKS: dict[str, Task] = {
    "class": classes.TASK,
    "text": text.TASK,
    "emoji": emoji.TASK,
    "video": video.TASK,
    "av": avsync.TASK,
    "audio": audio.TASK,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.epilog = "tasks:\n" + "\n".join(f"  {name:6} {task.summary}" for name, task in TASKS.items())
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--size", default="tiny", choices=SIZES, help="preset for the options not given")
    parser.add_argument("--n", type=int, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--dataset", default="fashion-mnist", help="source for --task class")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="Fashion-MNIST split")
    parser.add_argument("--resolution", help="HxW (text: 32x128 or 64x256; emoji: 64; video/av: 64x64)")
    parser.add_argument("--fps", type=int, help="video and av frame rate")
    parser.add_argument("--duration", type=float, help="seconds per clip (video, av, audio)")
    parser.add_argument("--sample-rate", type=int, help="audio sample rate in Hz (av, audio)")
    parser.add_argument("--source", default="mixed", choices=video.SOURCES, help="objects of --task video")
    parser.add_argument("--scene", default="mixed", choices=avsync.SCENES, help="scenes of --task av")
    parser.add_argument(
        "--voice", default="auto", choices=VOICES, help="speech: Asterisk recordings or flite"
    )
    args = parser.parse_args(argv)
    for option, value in TASKS[args.task].presets.get(args.size, {}).items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    return args
