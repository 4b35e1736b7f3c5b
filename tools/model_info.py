#!/usr/bin/env python
"""Size a preset without allocating it: parameters, tokens per modality, training FLOPs per sample.

    python tools/model_info.py configs/4b.yaml [key=value ...]

How the model is sized and the FLOPs counted (meta device, FlopCounterMode, Self-Flow's student, projector
and truncated teacher; the preset's clip and a realistic 5 s 480p sample): `training/flops.py`.
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
