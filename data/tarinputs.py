"""make_shards input from existing WebDataset shards (img2dataset, video2dataset, ...): which shards an
`--input` names, and a scan that stages their samples as a media folder for the ordinary pipeline.

    sources = tar_sources("/data/laion/{00000..00009}.tar")  # None for a media folder or a manifest
    staged = stage_tars(sources, out / ".staging", limits)    # entries, skips, fingerprint, where

Sources: a folder holding `.tar` files and no media, one `.tar`, a glob (`/data/*.tar`), a brace pattern
(`/data/{00000..00009}.tar`), or a URL that webdataset's gopen opens (`pipe:cat /x/{0..3}.tar`,
`file:/x/a.tar`, `http(s)://...`), brace-expanded as webdataset does.

Why staging: `prepare.prepare` decodes one file per entry, in any process of the pool. Streaming each
shard once and writing each sample's media to `<staging>/<key>.<field>` gives entries that go through
exactly the same decoding, limits, re-encoding, clip cutting, ordering and resuming as a media folder,
with only one sample's bytes in memory at a time. The resume log's fingerprint hashes every staged key,
caption, metadata and media byte: it does not depend on where the shards or the output lie, and it
notices a changed shard even when no size changes. The cost is disk: the staging holds a copy of the
media until make_shards removes it at the end.

A sample is: a media field (`mp4`/`mov`/`m4v`/`webm`/`mkv`, `jpg`/`jpeg`/`png`/`webp`,
`flac`/`wav`/`mp3`/`ogg`/`opus`/`m4a`; the first in that order if there are several), a caption (`txt`,
else a `caption` field, else `json[caption_key]`) and optional `json` metadata (kept if it is an
object). Keys are sanitised by `inputs.to_key` (`00000/000000123` -> `00000_000000123`). Everything
unusable is a Skip at `<shard>:<key>`; a shard that cannot be opened or read to its end is a Skip at
`<shard>`, and so is the last sample read before the damage (it may be missing members).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from selfflow.data.decode import DecodeLimits
from selfflow.data.fields import AUDIO_CONTAINERS, IMAGE_FIELDS, VIDEO_CONTAINERS, caption_of
from selfflow.data.inputs import Entry, Skip, check_caption, kind_of, to_key
from selfflow.data.shards import is_url, iter_tar_samples, shard_error
from selfflow.data.sources import expand_source

# media fields in the reader's order of preference (`fields.infer_task`) -> Entry kind
MEDIA_FIELDS = {
    **dict.fromkeys(VIDEO_CONTAINERS, "mp4"),  # "mp4": any video container
    **dict.fromkeys(IMAGE_FIELDS, "image"),
    **dict.fromkeys(AUDIO_CONTAINERS, "audio"),
}
_GLOB = "*?["
MAX_KEY = 200  # staged as `<key>.<field>`, and clips add `_c000`: within any file system's name limit


@dataclass
class Staged:
    """What make_shards scans: entries sorted by key, skips, a fingerprint of the inputs (for the resume
    log), and where each staged file came from (`<shard>:<key>`, for skip reports)."""

    entries: list[Entry]
    skips: list[Skip]
    fingerprint: str
    where: dict[str, str] = field(default_factory=dict)

    def locate(self, skips: list[Skip]) -> list[Skip]:
        """Skips with staged paths replaced by their `<shard>:<key>`."""
        return [Skip(self.where.get(s.path, s.path), s.reason) for s in skips]


def tar_sources(text: str) -> list[str] | None:
    """The shards `--input` names, in order, or None when it names a media folder or a manifest (or
    nothing that exists: the folder scan says so). ValueError for a pattern that matches nothing, or a
    folder with both shards and media (which of them is meant is not clear)."""
    path = Path(text)
    if is_url(text):
        return expand_source(text)
    if path.is_dir():
        names = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        tars = [str(p) for p in names if p.suffix == ".tar" and p.is_file()]
        if tars and any(kind_of(p) for p in names):
            raise ValueError(
                f"input folder {text} holds both .tar shards and media files: name the shards with a "
                f"pattern ({path / '*.tar'}) or move the media to a folder of their own"
            )
        return tars or None
    if path.exists() or not any(c in text for c in _GLOB + "{"):
        return [text] if path.is_file() and path.suffix == ".tar" else None
    try:
        return expand_source(text)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err


def check_sources(sources: list[str], output: Path) -> None:
    """The output folder must not hold input shards: its own shards would become inputs of a rerun."""
    for source in sources:
        if not is_url(source) and Path(source).resolve().parent == output.resolve():
            raise ValueError(f"--output {output} must not be the folder of the input shard {source}")


def _text(data: bytes | str, what: str) -> str:
    try:
        return data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8") from err


def _caption_and_meta(sample: dict, caption_key: str) -> tuple[str, dict]:
    """The caption (`txt`, else `caption`, else `json[caption_key]`) and the `json` object (or {})."""
    meta = {}
    if "json" in sample:
        try:
            loaded = json.loads(_text(sample["json"], "json"))
        except json.JSONDecodeError as err:
            raise ValueError(f"json is not valid JSON: {err}") from err
        meta = loaded if isinstance(loaded, dict) else {}
    return check_caption(caption_of(sample, caption_key)), meta


def _media(sample: dict) -> tuple[str, str]:
    """(field, Entry kind) of the sample's media; ValueError naming what is wrong."""
    for name, kind in MEDIA_FIELDS.items():
        if name in sample:
            return name, kind
    fields = ", ".join(sorted(f for f in sample if not f.startswith("__"))) or "none"
    raise ValueError(f"no media field (fields: {fields})")


class _Stager:
    """Writes accepted samples into the staging folder and collects entries, skips and the digest."""

    def __init__(self, staging: Path, caption_key: str) -> None:
        self.staging, self.caption_key = staging, caption_key
        self.entries: list[Entry] = []
        self.skips: list[Skip] = []
        self.where: dict[str, str] = {}
        self.owner: dict[str, str] = {}  # sanitised key -> `<shard>:<key>` that took it
        self.digest = hashlib.sha256()

    def add(self, source: str, sample: dict) -> None:
        where = f"{source}:{sample['__key__']}"
        try:
            if "__error__" in sample:
                raise ValueError(f"{sample['__error__']} (--limit max_field_mb)")
            name, kind = _media(sample)
            caption, meta = _caption_and_meta(sample, self.caption_key)
        except ValueError as err:
            self.skips.append(Skip(where, str(err)))
            return
        key = to_key(sample["__key__"])
        if len(key) > MAX_KEY:
            self.skips.append(Skip(where, f"key is longer than {MAX_KEY} characters"))
            return
        if key in self.owner:
            self.skips.append(Skip(where, f"key {key!r} is already taken by {self.owner[key]}"))
            return
        self.owner[key] = where
        media = self.staging / f"{key}.{name}"
        media.write_bytes(sample[name])
        record = json.dumps([key, name, len(sample[name]), caption, meta], sort_keys=True, default=str)
        self.digest.update(record.encode() + sample[name])
        self.where[str(media)] = where
        self.entries.append(Entry(key, media, kind, caption, meta))

    def stage(self, source: str, max_member_bytes: int) -> None:
        """Every sample of one shard; a shard that fails is a Skip from there on (`iter_tar_samples`
        yields only whole samples: not the one a damaged header cut)."""
        try:
            for sample in iter_tar_samples(source, max_member_bytes):
                self.add(source, sample)
        except (tarfile.TarError, OSError) as err:
            self.skips.append(Skip(source, f"cannot read shard: {shard_error(err)}"))


def stage_tars(
    sources: list[str], staging: Path, limits: DecodeLimits, caption_key: str = "caption", quiet: bool = True
) -> Staged:
    """Stream every shard once into a fresh `staging` folder (see the module docstring)."""
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir(parents=True)
    stager = _Stager(staging, caption_key)
    stager.digest.update(b"selfflow-tarinputs/1\0")  # the content counts, not where the shards lie
    for source in tqdm(sources, unit="shard", desc="reading shards", disable=quiet, file=sys.stderr):
        stager.stage(source, int(limits.max_field_mb * 1e6))
    entries = sorted(stager.entries, key=lambda e: e.key)
    skips = sorted(stager.skips, key=lambda s: (s.path, s.reason))
    return Staged(entries, skips, stager.digest.hexdigest(), stager.where)
