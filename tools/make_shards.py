#!/usr/bin/env python
"""Pack a folder of captioned media into WebDataset shards, with a manifest and a verify pass.

    python tools/make_shards.py --input DIR --output OUT [--name NAME] [--shard-samples N]
                                [--shard-mb M] [--size HxW] [--verify]
    python tools/make_shards.py --output OUT --verify      # only check existing shards

Input: the top level of DIR. Each media file `<stem>.<ext>` needs a caption `<stem>.txt` and may have
metadata `<stem>.json` (an object). Only images for now: png, jpg/jpeg, webp. Every image is fully
decoded and checked before it is written; a file that fails (corrupt image, missing or empty caption,
bad JSON, unknown type, a sidecar with no media) is skipped and listed in OUT/skipped.jsonl as
{"path", "reason"}. The run fails only when nothing valid remains.

Output: one shard set per task, `OUT/image-000000.tar`, ... (`--name` renames the set), holding
`__key__`, the image (`png`, or the original `jpg` / `webp` bytes; `png` after --size), `txt` and
`json` per sample, sorted by key; OUT/manifest.json with counts, resolutions, per-shard sample counts
and sha256, and the arguments. Reruns with the same arguments give byte-identical shards; stale shards
of the set from an earlier, larger run are deleted. Later modalities (video, audio, av) add a suffix
table entry and a `prepare_*` function each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from selfflow.data.decode import (
    IMAGE_FIELD_OF_FORMAT,
    IMAGE_FIELDS,
    normalize_mode,
    open_image,
    parse_size,
    png_bytes,
    resize_center_crop,
)
from selfflow.data.shards import (
    KEY_PATTERN,
    TEMP_SUFFIX,
    ShardInfo,
    ShardWriter,
    iter_tar_samples,
    sha256_file,
)

MANIFEST, SKIPPED = "manifest.json", "skipped.jsonl"
FORMAT = "selfflow-shards/1"
TASK_OF_SUFFIX = {".png": "image", ".jpg": "image", ".jpeg": "image", ".webp": "image"}
SIDECARS = (".txt", ".json")
MEDIA_FIELDS = {"image": IMAGE_FIELDS}  # a stored sample of the task holds one of these fields


@dataclass(frozen=True)
class Entry:
    key: str
    task: str
    media: Path
    caption: Path | None
    meta: Path | None


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


# ---------------------------------------------------------------------- scanning and validation
def scan(folder: Path) -> tuple[list[Entry], list[Skip]]:
    """Group the top-level files of `folder` by stem into entries; everything unusable becomes a Skip."""
    groups: dict[str, list[Path]] = {}
    skips: list[Skip] = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if path.is_dir():
            skips.append(Skip(str(path), "subfolder (only the top level of --input is read)"))
        elif suffix in TASK_OF_SUFFIX or suffix in SIDECARS:
            groups.setdefault(path.stem, []).append(path)
        else:
            skips.append(Skip(str(path), f"unknown file type {suffix or '(no extension)'!r}"))
    entries: list[Entry] = []
    used: dict[str, Path] = {}
    for stem, paths in sorted(groups.items()):
        media = [p for p in paths if p.suffix.lower() in TASK_OF_SUFFIX]
        sidecars = {p.suffix.lower(): p for p in paths if p.suffix.lower() in SIDECARS}
        if not media:
            skips.extend(Skip(str(p), "no media file with this name") for p in paths)
            continue
        skips.extend(Skip(str(p), f"another media file is named {stem!r}") for p in media[1:])
        key = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
        if key in used:
            skips.append(Skip(str(media[0]), f"key {key!r} is already taken by {used[key].name}"))
            continue
        used[key] = media[0]
        task = TASK_OF_SUFFIX[media[0].suffix.lower()]
        entries.append(Entry(key, task, media[0], sidecars.get(".txt"), sidecars.get(".json")))
    return entries, sorted(skips, key=lambda s: s.path)


def read_caption(path: Path | None) -> str:
    if path is None:
        raise ValueError("missing caption (.txt)")
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError("caption is not UTF-8") from err
    if not caption:
        raise ValueError("empty caption")
    return caption


def read_meta(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"metadata is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError("metadata JSON is not an object")
    return meta


def prepare_image(path: Path, size: tuple[int, int] | None) -> tuple[dict[str, bytes], str]:
    """The stored image field and its "HxW" resolution. Original bytes are kept unless the image is
    resized or in a format the loader does not read; then it becomes a lossless PNG."""
    data = path.read_bytes()
    img = open_image(data)
    field = IMAGE_FIELD_OF_FORMAT.get(img.format)
    if size is not None or field is None:
        img = normalize_mode(img)
        if size is not None:
            img = resize_center_crop(img, *size)
        data, field = png_bytes(img), "png"
    return {field: data}, f"{img.height}x{img.width}"


PREPARE: dict[str, Callable[[Path, tuple[int, int] | None], tuple[dict[str, bytes], str]]] = {
    "image": prepare_image
}


def build_sample(entry: Entry, size: tuple[int, int] | None) -> tuple[dict, str]:
    """A shard sample for the entry and its resolution; ValueError or OSError names what is wrong."""
    caption, meta = read_caption(entry.caption), read_meta(entry.meta)
    media, resolution = PREPARE[entry.task](entry.media, size)
    sample = {"__key__": entry.key, **media, "txt": caption, "json": json.dumps(meta, sort_keys=True)}
    return sample, resolution


# ---------------------------------------------------------------------- writing
def _atomic_write(path: Path, text: str) -> None:
    temp = path.with_name(path.name + TEMP_SUFFIX)
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _remove_stale(output: Path, name: str, keep: list[ShardInfo]) -> None:
    """Delete shards of this set left by an earlier run that wrote more of them, and orphaned temps."""
    kept = {info.file for info in keep}
    pattern = re.compile(re.escape(name) + r"-\d{6}\.tar(" + re.escape(TEMP_SUFFIX) + ")?")
    for path in output.iterdir():
        if pattern.fullmatch(path.name) and path.name not in kept:
            path.unlink()


def write_shards(entries: list[Entry], args: argparse.Namespace) -> tuple[dict, dict, list[Skip]]:
    """Shard infos per task and resolution counts per task; the entries that failed become skips."""
    writers: dict[str, ShardWriter] = {}
    resolutions: dict[str, Counter] = {}
    skips: list[Skip] = []
    with contextlib.ExitStack() as stack:
        for entry in entries:
            try:
                sample, resolution = build_sample(entry, args.size)
            except (ValueError, OSError) as err:
                skips.append(Skip(str(entry.media), str(err)))
                continue
            if entry.task not in writers:
                name = args.name or entry.task
                writer = ShardWriter(args.output, name, max_samples=args.shard_samples, max_mb=args.shard_mb)
                writers[entry.task] = stack.enter_context(writer)
            writers[entry.task].write(sample)
            resolutions.setdefault(entry.task, Counter())[resolution] += 1
    shards = {task: writer.shards for task, writer in writers.items()}
    for task, infos in shards.items():
        _remove_stale(args.output, args.name or task, infos)
    return shards, {task: dict(sorted(c.items())) for task, c in resolutions.items()}, skips


def check_output(output: Path, source: Path | None) -> None:
    if source is not None and output.resolve() == source.resolve():
        raise ValueError(f"--output {output} must differ from --input")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to output folder {output}: {err.strerror or err}") from err


def build(args: argparse.Namespace) -> str:
    """Scan, validate, write shards, skipped.jsonl and manifest.json; returns a summary line."""
    if not args.input.is_dir():
        raise ValueError(f"input folder {args.input} does not exist")
    check_output(args.output, args.input)
    entries, skips = scan(args.input)
    shards, resolutions, failed = write_shards(entries, args)
    skips = sorted(skips + failed, key=lambda s: s.path)
    _atomic_write(args.output / SKIPPED, "".join(json.dumps(asdict(s)) + "\n" for s in skips))
    counts = {task: sum(info.samples for info in infos) for task, infos in shards.items()}
    if not counts:
        raise ValueError(
            f"no valid samples in {args.input} ({len(skips)} skipped, see {args.output / SKIPPED})"
        )
    manifest = {
        "format": FORMAT,
        "counts": counts,
        "skipped": len(skips),
        "resolutions": resolutions,
        "shards": {task: [info.to_json() for info in infos] for task, infos in shards.items()},
        "args": {
            "input": str(args.input),
            "name": args.name,
            "shard_samples": args.shard_samples,
            "shard_mb": args.shard_mb,
            "size": None if args.size is None else "{}x{}".format(*args.size),
        },
    }
    _atomic_write(args.output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    written = ", ".join(f"{n} {task} samples in {len(shards[task])} shard(s)" for task, n in counts.items())
    return f"wrote {written} to {args.output}; skipped {len(skips)} (see {args.output / SKIPPED})"


# ---------------------------------------------------------------------- verification
def _sample_problem(sample: dict, task: str) -> str | None:
    if not any(field in sample for field in MEDIA_FIELDS[task]):
        return f"{sample['__key__']}: no {task} field"
    if not sample.get("txt", b"").strip():
        return f"{sample['__key__']}: no caption"
    return None


def verify(output: Path) -> list[str]:
    """Re-read every shard in the manifest; the list of mismatches is empty when all is well."""
    path = output / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {output}; nothing to verify")
    manifest = json.loads(path.read_text())
    problems: list[str] = []
    for task, infos in manifest["shards"].items():
        total = 0
        for info in infos:
            shard = output / info["file"]
            if not shard.is_file():
                problems.append(f"{info['file']}: missing")
                continue
            if sha256_file(shard) != info["sha256"]:
                problems.append(f"{info['file']}: sha256 differs from the manifest")
            try:
                samples = list(iter_tar_samples(shard))
            except (tarfile.TarError, OSError) as err:
                problems.append(f"{info['file']}: unreadable ({err})")
                continue
            problems += [p for p in (_sample_problem(s, task) for s in samples) if p]
            if len(samples) != info["samples"]:
                problems.append(f"{info['file']}: {len(samples)} samples, manifest says {info['samples']}")
            total += len(samples)
        if total != manifest["counts"].get(task):
            problems.append(
                f"{task}: {total} samples in shards, manifest counts {manifest['counts'].get(task)}"
            )
    return problems


# ---------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="folder of media + .txt (+ .json) files")
    parser.add_argument("--output", type=Path, required=True, help="folder for shards and manifest")
    parser.add_argument("--name", help="shard set name (default: the task, e.g. 'image')")
    parser.add_argument("--shard-samples", type=int, help="at most this many samples per shard")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="about this many MB per shard at most")
    parser.add_argument("--size", type=_size, help="resize and centre-crop images to HxW")
    parser.add_argument("--verify", action="store_true", help="re-read the shards and check the manifest")
    args = parser.parse_args(argv)
    if args.input is None and not args.verify:
        parser.error("--input is required unless only --verify is asked for")
    if args.name is not None and not KEY_PATTERN.fullmatch(args.name):
        parser.error(f"--name {args.name!r} may use only letters, digits, '_' and '-'")
    if (args.shard_samples is not None and args.shard_samples < 1) or args.shard_mb <= 0:
        parser.error("--shard-samples and --shard-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.input is not None:
            print(build(args))
        if args.verify:
            problems = verify(args.output)
            for problem in problems:
                print(f"verify: {problem}", file=sys.stderr)
            if problems:
                return 1
            print(f"verify: {args.output} matches its manifest")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
