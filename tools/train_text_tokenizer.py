"""Train a sentencepiece caption tokenizer.

Usage (from the repo root)::

    python tools/train_text_tokenizer.py --captions captions.txt data/clips/ \
        --out tok/captions --vocab-size 4000

A file is read as one caption per line; a folder means every ``*.txt`` under it (recursively), e.g.
sidecar caption files. Writes ``<out>.model`` and ``<out>.vocab`` and prints the ``.model`` path.
Bad input exits with code 2 and a one-line error, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfflow.configs.extras import check, reports_missing_extras


def collect_caption_files(inputs: list[Path]) -> list[Path]:
    """Expand files and folders (all ``*.txt`` below, sorted) into a list of caption files."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.txt") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"caption path not found: {p}")
    if not files:
        raise ValueError(f"no caption files found in: {' '.join(str(p) for p in inputs)}")
    return files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    ap = argparse.ArgumentParser(description="Train a sentencepiece tokenizer on captions.")
    ap.add_argument("--captions", type=Path, nargs="+", required=True, help="caption files or folders")
    ap.add_argument("--out", type=Path, required=True, help="output prefix (writes <out>.model/.vocab)")
    ap.add_argument("--vocab-size", type=int, required=True, help="target vocab size (soft limit)")
    ap.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    return ap.parse_args(argv)


@reports_missing_extras("selfflow-train-tokenizer")
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = parse_args(argv)
    check("encoders")
    from selfflow.tokenizers.text import train_sentencepiece  # imported here: --help starts without torch

    try:
        files = collect_caption_files(args.captions)
        model = train_sentencepiece(files, args.out, args.vocab_size, model_type=args.model_type)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
