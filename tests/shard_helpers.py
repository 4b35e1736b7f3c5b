"""Reading back what make_shards wrote, for the make_shards tests."""

from __future__ import annotations

import json
from pathlib import Path

from selfflow.data.shards import iter_tar_samples


def samples_of(out: Path, task: str) -> list[dict]:
    return [s for tar in sorted(out.glob(f"{task}-*.tar")) for s in iter_tar_samples(tar)]


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
