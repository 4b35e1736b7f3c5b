"""WebDataset shards: a deterministic writer, a streaming reader, and hashing.

A shard is a plain tar in which the files of one sample sit next to each other and share a key:
`fmnist_train_000123.png`, `fmnist_train_000123.txt`, ... (WebDataset's convention: the key is the
file name up to its first dot, the field is the rest). Shards of one set are named
`<name>-000000.tar`, `<name>-000001.tar`, ...

The writer makes reruns byte-identical: every tar header has the same mtime, owner and mode, the
fields of a sample are written in sorted order, and nothing depends on the clock or the machine. Each
shard is written to `<file>.tmp` and renamed only once it is complete, so a crash never leaves a
half-written shard under a real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

SHARD_NAME = "{name}-{index:06d}.tar"
TEMP_SUFFIX = ".tmp"
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")  # no dots (they split key from field) and no slashes
FIELD_PATTERN = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
MTIME = 1577836800  # 2020-01-01: a fixed date for every member, so shard bytes never depend on the clock
_BLOCK = 512  # tar header and data granularity
_END = 2 * _BLOCK + tarfile.RECORDSIZE  # end-of-archive blocks plus worst-case record padding

Sample = Mapping[str, "str | bytes"]  # "__key__" -> key, field ("png", "txt", ...) -> payload


@dataclass(frozen=True)
class ShardInfo:
    file: str  # file name inside the shard folder
    samples: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return asdict(self)


def check_key(key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"sample key {key!r} must be non-empty and use only letters, digits, '_' and '-'")
    return key


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _payloads(sample: Sample) -> list[tuple[str, bytes]]:
    """(field, bytes) pairs in sorted field order; text becomes UTF-8."""
    if "__key__" not in sample:
        raise ValueError("sample has no '__key__'")
    fields = []
    for field in sorted(f for f in sample if not f.startswith("__")):
        if not FIELD_PATTERN.fullmatch(field):
            raise ValueError(
                f"field {field!r} must be lower-case letters, digits and '_' (dots between parts)"
            )
        value = sample[field]
        fields.append((field, value.encode("utf-8") if isinstance(value, str) else bytes(value)))
    if not fields:
        raise ValueError(f"sample {sample['__key__']!r} has no fields")
    return fields


def _tar_size(payloads: list[tuple[str, bytes]]) -> int:
    """Bytes these members take in a tar: one header block each plus data rounded up to blocks."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for _, data in payloads)


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples into `<folder>/<name>-%06d.tar`, starting a new shard when the current one holds
    `max_samples` samples or the next sample would take it past about `max_mb` megabytes (a sample
    larger than `max_mb` gets a shard of its own). `close()` returns one ShardInfo per shard.

    Use as a context manager: on an exception the unfinished shard's temporary file is deleted.
    """

    def __init__(
        self, folder: str | Path, name: str, *, max_samples: int | None = None, max_mb: float | None = None
    ) -> None:
        if not KEY_PATTERN.fullmatch(name):
            raise ValueError(f"shard set name {name!r} must use only letters, digits, '_' and '-'")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        if max_mb is not None and max_mb <= 0:
            raise ValueError(f"max_mb must be positive, got {max_mb}")
        self.folder, self.name = Path(folder), name
        self.max_samples = max_samples
        self.max_bytes = None if max_mb is None else int(max_mb * 1_000_000)
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self._count = self._size = 0

    # ------------------------------------------------------------------ writing
    def write(self, sample: Sample) -> None:
        key = check_key(str(sample.get("__key__", "")))
        payloads = _payloads(sample)
        size = _tar_size(payloads)
        if self._tar is not None and self._full(size):
            self._finish()
        if self._tar is None:
            self._start()
        for field, data in payloads:
            self._tar.addfile(_header(f"{key}.{field}", len(data)), io.BytesIO(data))
        self._count += 1
        self._size += size

    def _full(self, incoming: int) -> bool:
        if self.max_samples is not None and self._count >= self.max_samples:
            return True
        return self.max_bytes is not None and self._size + incoming + _END > self.max_bytes

    def _path(self, index: int) -> Path:
        return self.folder / SHARD_NAME.format(name=self.name, index=index)

    def _start(self) -> None:
        final = self._path(len(self.shards))
        # both stay open across write() calls; _finish or _abort closes them
        self._file = open(final.with_name(final.name + TEMP_SUFFIX), "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        self._count = self._size = 0

    def _finish(self) -> None:
        final = self._path(len(self.shards))
        temp = final.with_name(final.name + TEMP_SUFFIX)
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        os.replace(temp, final)
        self.shards.append(ShardInfo(final.name, self._count, final.stat().st_size, sha256_file(final)))

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            temp = self._path(len(self.shards))
            temp.with_name(temp.name + TEMP_SUFFIX).unlink(missing_ok=True)
        self._tar = self._file = None

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return list(self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


# ---------------------------------------------------------------------- reading
def _split_name(name: str) -> tuple[str, str] | None:
    """ "dir/abc.seg.png" -> ("dir/abc", "seg.png"); None for a name without a field."""
    folder, _, base = name.rpartition("/")
    key, dot, field = base.partition(".")
    if not dot or not key:
        return None
    return (f"{folder}/{key}" if folder else key), field.lower()


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, str | bytes]]:
    """Stream the samples of one shard as {"__key__": key, field: bytes, ...}.

    Consecutive members with the same key form a sample. Raises tarfile.TarError or OSError if the
    file is unreadable or truncated (after yielding the samples before the damage).
    """
    with tarfile.open(path, mode="r|") as tar:
        sample: dict[str, str | bytes] | None = None
        for member in tar:
            parts = _split_name(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, field = parts
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            sample[field] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
