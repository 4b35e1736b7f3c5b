#!/usr/bin/env python
"""Size a preset without allocating it: parameters, tokens per modality, training FLOPs per sample.

    python tools/model_info.py configs/4b.yaml [key=value ...]

The model is built on the meta device. FLOPs are counted by torch's FlopCounterMode on meta
tensors (matmuls and attention; elementwise work is not counted, as is usual for MFU):
Self-Flow's student forward+backward with two noise levels per sample, its projector, and the EMA
teacher's forward truncated after block k = round(0.7 depth).

Two samples are sized: the preset's training clip, and a realistic one in the preset's codec geometry
(`realistic_spec`): about 5 s of 480 x 848 video at about 16 fps with 44.1 kHz audio, and a 1024 px
image. Its exact length is the first whole number of audio tokens past 5 s, and its frame count the
nearest one the video codec and time patch accept (Wan-class causal VAEs: 1 + 4k frames).
"""

from __future__ import annotations

import argparse
import sys

from selfflow.configs.extras import reports_missing_extras


@reports_missing_extras("selfflow-model-info")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="preset name or YAML path, e.g. configs/4b.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    from selfflow.configs import ConfigError, load_config  # imported here: --help starts without torch
    from selfflow.training.flops import report

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
