#!/usr/bin/env python
"""Prompt(s) -> silent mp4 video(s) (H.264) plus a PNG contact sheet and a JSON sidecar.

    python inference/sample_video.py --prompt "the digit 3 moves to the right" --out clip.mp4

Options as in `sample_av.py` (`--model`, default the shipped model; `--prompts`, `--steps`, `--sampler`,
`--cfg`, `--seed`, `--duration`, `--fps`, `--size`); only video tokens are sampled.
"""

from __future__ import annotations

import sys

from selfflow.inference import sample_av


def main(argv: list[str] | None = None) -> int:
    return sample_av.main(argv, modalities=("video",))


if __name__ == "__main__":
    sys.exit(main())
