"""What make_shards reads: a folder of media with sidecar captions, or a JSONL / CSV manifest.

    entries, skips = scan_inputs(Path("media/"))      # or Path("list.jsonl"), Path("list.csv")

Folder: the top level only, hidden names (`.*`) ignored. A media file `<stem>.<ext>` needs a caption
`<stem>.txt` and may have metadata `<stem>.json` (an object). Manifest: one row per sample with `path`
(relative to the manifest's folder, or absolute) and `caption`, optionally `key`; JSONL rows may carry a
`meta` object, and any other column or key becomes metadata too.

Every input becomes an Entry (sorted by key, the order samples are written in) or a Skip with the
reason. Captions and metadata are read here; decoding the media is left to `prepare`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from selfflow.data.fields import AUDIO_CONTAINERS, VIDEO_CONTAINERS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# the task of a video (video or av) depends on its audio track, found by probing
VIDEO_SUFFIXES = tuple(f".{name}" for name in VIDEO_CONTAINERS)
AUDIO_SUFFIXES = tuple(f".{name}" for name in AUDIO_CONTAINERS)
KIND_OF_SUFFIX = {
    **dict.fromkeys(IMAGE_SUFFIXES, "image"),
    **dict.fromkeys(VIDEO_SUFFIXES, "mp4"),
    **dict.fromkeys(AUDIO_SUFFIXES, "audio"),
}
SIDECARS = (".txt", ".json")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
_RESERVED = ("path", "caption", "key", "meta")


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


@dataclass(frozen=True)
class Entry:
    key: str  # sample key (clips add `_c000`, ...)
    media: Path
    kind: str  # "image", "mp4" (any video container) or "audio"
    caption: str
    meta: dict = field(default_factory=dict)


def to_key(name: str) -> str:
    """A WebDataset key from a file stem: anything but letters, digits, '_' and '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def kind_of(path: Path) -> str | None:
    return KIND_OF_SUFFIX.get(path.suffix.lower())


def check_caption(text: str | None) -> str:
    """The stripped caption, or ValueError naming what is wrong with it."""
    if text is None:
        raise ValueError("missing caption")
    caption = text.strip()
    if not caption:
        raise ValueError("empty caption")
    return caption


def _read_caption(path: Path | None) -> str:
    if path is None:
        raise ValueError("missing caption (no .txt file)")
    try:
        return check_caption(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError("caption is not UTF-8") from err


def _read_meta(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"metadata is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError("metadata JSON is not an object")
    return meta


def _unique(candidates: list[tuple[str, Path, str, str, dict]]) -> tuple[list[Entry], list[Skip]]:
    """Entries sorted by key from (key, media, kind, caption, meta); a repeated key is a Skip."""
    entries: list[Entry] = []
    skips: list[Skip] = []
    owner: dict[str, Path] = {}
    for key, media, kind, caption, meta in sorted(candidates, key=lambda c: (c[0], str(c[1]))):
        if key in owner:
            skips.append(Skip(str(media), f"key {key!r} is already taken by {owner[key]}"))
            continue
        owner[key] = media
        entries.append(Entry(key, media, kind, caption, meta))
    return entries, skips


def scan_folder(folder: Path) -> tuple[list[Entry], list[Skip]]:
    """Group the top-level files of `folder` by stem into entries; everything unusable becomes a Skip."""
    groups: dict[str, list[Path]] = {}
    skips: list[Skip] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # hidden files and folders (stamps, editor and OS files)
            continue
        suffix = path.suffix.lower()
        if path.is_dir():
            skips.append(Skip(str(path), "subfolder (only the top level of --input is read)"))
        elif kind_of(path) or suffix in SIDECARS:
            groups.setdefault(path.stem, []).append(path)
        else:
            skips.append(Skip(str(path), f"unknown file type {suffix or '(no extension)'!r}"))
    candidates = []
    for stem, paths in sorted(groups.items()):
        media = [p for p in paths if kind_of(p)]
        sidecars = {p.suffix.lower(): p for p in paths if not kind_of(p)}
        if not media:
            skips.extend(Skip(str(p), "no media file with this name") for p in paths)
            continue
        skips.extend(Skip(str(p), f"another media file is named {stem!r}") for p in media[1:])
        try:
            caption, meta = _read_caption(sidecars.get(".txt")), _read_meta(sidecars.get(".json"))
        except (ValueError, OSError) as err:
            skips.append(Skip(str(media[0]), str(err)))
            continue
        candidates.append((to_key(stem), media[0], kind_of(media[0]), caption, meta))
    entries, taken = _unique(candidates)
    return entries, skips + taken


def _manifest_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) per record; `where` is `file:line` for skip reports."""
    text = path.read_text(encoding="utf-8")
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: the CSV header needs a 'path' column")
        for row in reader:  # empty cells are absent values; cells beyond the header are dropped
            values = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
            rows.append((f"{path.name}:{reader.line_num}", values))
        return rows
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row = {"__error__": f"line is not valid JSON: {err}"}
        if not isinstance(row, dict):
            row = {"__error__": "line is not a JSON object"}
        rows.append((f"{path.name}:{i + 1}", row))
    return rows


def _manifest_candidate(row: dict, base: Path) -> tuple[str, Path, str, str, dict]:
    if "__error__" in row:
        raise ValueError(row["__error__"])
    if not isinstance(row.get("path"), str) or not row["path"]:
        raise ValueError("no 'path'")
    media = base / row["path"]  # an absolute path replaces the base
    kind = kind_of(media)
    if kind is None:
        raise ValueError(f"unknown file type {media.suffix.lower() or '(no extension)'!r}")
    if not media.is_file():
        raise ValueError(f"media file {media} not found")
    caption = check_caption(row.get("caption") if isinstance(row.get("caption"), str) else None)
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' is not an object")
    extra = {k: v for k, v in row.items() if k not in _RESERVED}
    return to_key(str(row.get("key") or media.stem)), media, kind, caption, {**extra, **meta}


def scan_manifest(path: Path) -> tuple[list[Entry], list[Skip]]:
    """Entries of a JSONL or CSV manifest; a bad row becomes a Skip at `manifest:line`."""
    candidates, skips = [], []
    for where, row in _manifest_rows(path):
        try:
            candidates.append(_manifest_candidate(row, path.parent))
        except ValueError as err:
            named = isinstance(row.get("path"), str) and row["path"]
            skips.append(Skip(str(path.parent / row["path"]) if named else str(path), f"{where}: {err}"))
    entries, taken = _unique(candidates)
    return entries, skips + taken


def scan_inputs(source: Path) -> tuple[list[Entry], list[Skip]]:
    """Entries sorted by key and skips sorted by path, from a folder or a manifest file."""
    if source.is_dir():
        entries, skips = scan_folder(source)
    elif source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
        entries, skips = scan_manifest(source)
    elif source.exists():
        raise ValueError(f"input {source} is neither a folder nor a .jsonl / .csv manifest")
    else:
        raise ValueError(f"input {source} does not exist")
    return entries, sorted(skips, key=lambda s: (s.path, s.reason))


def fingerprint(source: Path, entries: list[Entry]) -> str:
    """Changes when an input file is added, removed, resized or touched, or a caption changes."""
    digest = hashlib.sha256(str(source.resolve()).encode())
    if source.is_file():
        digest.update(source.read_bytes())
    for entry in entries:
        stat = entry.media.stat()
        record = [entry.key, str(entry.media), stat.st_size, stat.st_mtime_ns, entry.caption, entry.meta]
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    return digest.hexdigest()
