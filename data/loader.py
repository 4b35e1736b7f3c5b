"""Where a task's shards are: a make_shards folder (its manifest, else `<task>-*.tar`), a glob, a brace
pattern, one file or a list; and what a shard folder holds. The reader is `data/pipeline.py`.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from webdataset.shardlists import expand_urls

from selfflow.data.shards import is_url

MANIFEST = "manifest.json"
ShardSource = str | Path | list[str | Path] | tuple[str | Path, ...]


def _manifest_shards(folder: Path, task: str) -> list[str] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return [str(folder / shard["file"]) for shard in manifest.get("shards", {}).get(task, [])]


def split_sources(shards: ShardSource) -> list[str]:
    """`a,b` -> ["a", "b"]: several shard folders / patterns in one string (commas inside a brace
    pattern stay); a list is returned as strings."""
    if isinstance(shards, (list, tuple)):
        return [str(s) for s in shards]
    parts, depth, start, text = [], 0, 0, str(shards)
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def resolve_shards(shards: ShardSource, task: str = "image") -> list[str]:
    """Shard paths from a folder (its manifest, else `<task>-*.tar`), a glob, a brace pattern
    (`a-{000000..000009}.tar`), one file, or a list of any of these."""
    if isinstance(shards, (list, tuple)):
        paths = [p for item in shards for p in resolve_shards(item, task)]
    else:
        text = str(shards)
        if Path(text).is_dir():
            found = _manifest_shards(Path(text), task)
            paths = found if found is not None else sorted(glob.glob(str(Path(text) / f"{task}-*.tar")))
        elif any(c in text for c in "*?["):
            paths = sorted(glob.glob(text))
        else:
            paths = expand_urls(text)
        if not paths:
            raise FileNotFoundError(f"no {task} shards found at {text}")
    for path in paths:
        if not is_url(path) and not Path(path).is_file():
            raise FileNotFoundError(f"shard {path} not found")
    return paths


def describe_shards(path: str | Path) -> dict:
    """What a shard folder holds: its manifest if present, else the tar files found by task prefix."""
    path = Path(path)
    folder = path.parent if path.name == MANIFEST else path
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} not found")
    if (folder / MANIFEST).is_file():
        return {"path": str(folder), "manifest": True, **json.loads((folder / MANIFEST).read_text())}
    shards: dict[str, list[dict]] = {}
    for tar in sorted(folder.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        task = tar.name.rsplit("-", 1)[0]
        shards.setdefault(task, []).append({"file": tar.name, "bytes": tar.stat().st_size})
    return {"path": str(folder), "manifest": False, "shards": shards}
