#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face model folder, the folder inference loads:

    python tools/export_snapshot.py runs/av --out models/av [--dtype float32] [--weights model] \
        [--title "..."] [--data notes.md] [--limitations notes.md] [--metrics eval.json]

The source is a run directory, its checkpoints/ folder or one checkpoint (the latest complete one is
used). The folder holds the model card (README.md), `transformer/` (MMDiT.from_pretrained), `scheduler/`
(a diffusers scheduler config), the resolved config, the codecs and snapshot.json with every file's
sha256 (inference/snapshot.py). `--data` / `--limitations` take text or a text file for the card;
`--metrics` takes a tools/evaluate.py report, whose sample scores and protocol go into the card's table.
It is written beside --out and renamed into place, so a failed export changes nothing; --out may be
new, an empty folder or an earlier model folder (with snapshot.json), never anything else. Publishing is
yours: `huggingface-cli upload USER/NAME models/av` (or `MMDiT.push_to_hub` for the transformer alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DTYPE_NAMES = ("float16", "bfloat16", "float32")  # inference/snapshot.py DTYPES, named without torch


def _text(value: str | None) -> str:
    """A card section: the contents of a file of that name, else the text itself."""
    if not value:
        return ""
    path = Path(value)
    return path.read_text(encoding="utf-8") if path.is_file() else value


def card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """A tools/evaluate.py report -> card rows: the protocol, then each task's sample scores (nested
    scores flattened with dots, e.g. "av sync.within_frame"; counts and spreads left out)."""
    settings = report.get("settings", {})
    rows: dict[str, Any] = {}
    if settings:
        rows["protocol"] = (
            f"{settings.get('protocol', 'n/a')}: {settings.get('steps')} {settings.get('sampler')} steps, "
            f"CFG {settings.get('cfg_scale')}, shift {settings.get('shift')}, n = {settings.get('n')}"
        )

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, int | float) and not isinstance(node, bool):
            leaf = prefix.rsplit(".", 1)[-1].rsplit(" ", 1)[-1]
            if leaf != "n" and not leaf.startswith("n_") and not leaf.endswith("_std"):
                rows[prefix] = round(node, 4) if isinstance(node, float) else node

    for task, sides in report.get("tasks", {}).items():
        for key, value in (sides.get("samples") or {}).items():
            walk(f"{task} {key}", value)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="run dir, checkpoints/ dir or one checkpoint")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--dtype", default="float16", choices=DTYPE_NAMES)
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights to export")
    p.add_argument("--title", default="Self-Flow MMDiT", help="the model card's title")
    p.add_argument("--data", help="the card's Data section: text, or a file holding it")
    p.add_argument("--limitations", help="the card's Limitations section: text, or a file holding it")
    p.add_argument("--metrics", type=Path, help="a tools/evaluate.py JSON report for the card")
    args = p.parse_args(argv)
    from selfflow.inference.snapshot import INFO, WEIGHTS, CardText, export_snapshot  # torch: after --help

    try:
        metrics = card_metrics(json.loads(args.metrics.read_text())) if args.metrics else {}
        card = CardText(args.title, _text(args.data), metrics, _text(args.limitations))
        out = export_snapshot(args.ckpt, args.out, args.dtype, args.weights, card)
    except (FileNotFoundError, ValueError, OSError) as e:  # ConfigError and JSON errors are ValueErrors
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    info = json.loads((out / INFO).read_text())
    print(f"{out}: step {info['step']}, {info['dtype']}, sha256 {info['files'][WEIGHTS][:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
