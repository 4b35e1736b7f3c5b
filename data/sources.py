"""Where the shards are, and which task each shard's samples feed. The reader is `data/pipeline.py`.

    sets = find_shards("/data/laion/{00000..00099}.tar,shards/av")   # ShardSets(typed=..., mixed=...)

A source (`data.shards`, comma-separated) is
- a make_shards folder: its manifest (else its `<task>-*.tar` files) says each shard's task ("typed");
- a folder of other `.tar` files, a glob, a brace pattern, one file, or a URL that webdataset's gopen
  opens (`pipe:aws s3 cp s3://bucket/{000..099}.tar -`, `file:`, `http(s):`): "mixed", where each
  sample's task is inferred from its fields (`data/fields.py`).
`data.task_shards` ({task: source}) makes a source's shards typed as that task.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.shardlists import expand_urls

from selfflow.data.shards import is_url

MANIFEST = "manifest.json"
TASKS = ("image", "video", "audio", "av")
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
    elif not is_url(str(shards)) and Path(shards).is_dir():
        found = _manifest_shards(Path(shards), task)
        paths = found if found is not None else sorted(glob.glob(str(Path(shards) / f"{task}-*.tar")))
        if not paths:
            raise FileNotFoundError(f"no {task} shards found at {shards}")
    else:
        return expand_source(str(shards))
    for path in paths:
        if not is_url(path) and not Path(path).is_file():
            raise FileNotFoundError(f"shard {path} not found")
    return paths


@dataclass
class ShardSets:
    typed: dict[str, list[str]] = field(default_factory=dict)  # task -> shards holding only that task
    mixed: list[str] = field(default_factory=list)  # shards whose samples are routed by their fields


def expand_source(source: str) -> list[str]:
    """The shards one source names: a URL brace-expanded as webdataset does; a local pattern
    brace-expanded, then each part globbed; a plain path. FileNotFoundError when nothing matches or a
    local shard is missing."""
    parts = expand_urls(source) if is_url(source) or "{" in source else [source]
    paths = [
        p for part in parts
        for p in (sorted(glob.glob(part)) if not is_url(part) and any(c in part for c in "*?[") else [part])
    ]  # fmt: skip
    if not paths:
        raise FileNotFoundError(f"no shards match {source}")
    for path in paths:
        if not is_url(path) and not Path(path).is_file():
            raise FileNotFoundError(f"shard {path} not found")
    return paths


def find_shards(shards: ShardSource, task_shards: dict[str, str] | None = None) -> ShardSets:
    """Every source of `shards` (and `task_shards`) sorted into typed and mixed shard lists."""
    sets = ShardSets()
    for source in split_sources(shards):
        folder = Path(source)
        if not is_url(source) and folder.is_dir():
            listed = {t: _manifest_shards(folder, t) for t in TASKS}
            if all(v is None for v in listed.values()):  # no manifest: shard names say the task
                listed = {t: sorted(glob.glob(str(folder / f"{t}-*.tar"))) for t in TASKS}
            named = {p for paths in listed.values() for p in paths or []}
            for task, paths in listed.items():
                sets.typed.setdefault(task, []).extend(paths or [])
            others = [p for p in sorted(glob.glob(str(folder / "*.tar"))) if p not in named]
            if not named and not others:
                raise FileNotFoundError(f"no .tar shards in {folder}")
            sets.mixed += others
        else:
            sets.mixed += expand_source(source)
    for task, source in (task_shards or {}).items():
        if task not in TASKS:
            raise ValueError(f"data.task_shards: unknown task {task!r} (one of {', '.join(TASKS)})")
        sets.typed.setdefault(task, []).extend(p for s in split_sources(source) for p in expand_source(s))
    sets.typed = {t: paths for t, paths in sets.typed.items() if paths}
    return sets


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
