"""WebDataset shards: a deterministic writer, a streaming reader, and hashing.

A shard is a plain tar in which the files of one sample sit next to each other and share a key:
`fmnist_train_000123.png`, `fmnist_train_000123.txt`, ... (WebDataset's convention: the key is the
file name up to its first dot, the field is the rest). Shards of one set are named
`<name>-000000.tar`, `<name>-000001.tar`, ...

The writers make reruns byte-identical: every tar header has the same mtime, owner and mode, the
fields of a sample are written in sorted order, and nothing depends on the clock or the machine. A
shard (`ShardFile`) is written to `<file>.tmp` and renamed only once it is complete, so a crash never
leaves a half-written shard under a real name. `ShardWriter` rolls over to the next shard when
`ShardLimits` says the current one is full, a rule that depends only on the samples in that shard.
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
from typing import IO

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


class ShardFile:
    """One shard being written: members go to `<path>.tmp`, which `finish()` renames to `<path>`.

    Use as a context manager: on an exception the temporary file is deleted.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.temp = self.path.with_name(self.path.name + TEMP_SUFFIX)
        self.samples = self.bytes = 0  # samples written, tar bytes of their members
        # both stay open across add() calls; finish() or abort() closes them
        self._file = open(self.temp, "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115

    def add(self, sample: Sample) -> None:
        key = check_key(str(sample.get("__key__", "")))
        payloads = _payloads(sample)
        for field, data in payloads:
            self._tar.addfile(_header(f"{key}.{field}", len(data)), io.BytesIO(data))
        self.samples += 1
        self.bytes += _tar_size(payloads)

    def finish(self) -> ShardInfo:
        """Close the tar, flush it to disk and give it its real name."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.path)
        return ShardInfo(self.path.name, self.samples, self.path.stat().st_size, sha256_file(self.path))

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(frozen=True)
class ShardLimits:
    """When a shard is full: `max_samples` samples, or about `max_mb` megabytes (a sample larger than
    that still gets a shard of its own)."""

    max_samples: int | None = None
    max_mb: float | None = None

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples}")
        if self.max_mb is not None and self.max_mb <= 0:
            raise ValueError(f"max_mb must be positive, got {self.max_mb}")

    def full(self, shard: ShardFile, incoming: Sample) -> bool:
        """Whether `incoming` must start a new shard instead of joining `shard`."""
        if shard.samples == 0:
            return False
        if self.max_samples is not None and shard.samples >= self.max_samples:
            return True
        if self.max_mb is None:
            return False
        return shard.bytes + _tar_size(_payloads(incoming)) + _END > int(self.max_mb * 1_000_000)


def shard_path(folder: str | Path, name: str, index: int) -> Path:
    return Path(folder) / SHARD_NAME.format(name=name, index=index)


class ShardWriter:
    """Writes samples into `<folder>/<name>-%06d.tar` (from `start_index` on), starting a new shard when
    the current one is full (see ShardLimits). `close()` returns one ShardInfo per shard.

    Use as a context manager: on an exception the unfinished shard's temporary file is deleted.
    """

    def __init__(
        self,
        folder: str | Path,
        name: str,
        *,
        max_samples: int | None = None,
        max_mb: float | None = None,
        start_index: int = 0,
    ) -> None:
        if not KEY_PATTERN.fullmatch(name):
            raise ValueError(f"shard set name {name!r} must use only letters, digits, '_' and '-'")
        self.folder, self.name = Path(folder), name
        self.limits = ShardLimits(max_samples, max_mb)
        self.shards: list[ShardInfo] = []
        self._start = start_index
        self._shard: ShardFile | None = None

    def write(self, sample: Sample) -> None:
        check_key(str(sample.get("__key__", "")))
        if self._shard is not None and self.limits.full(self._shard, sample):
            self.shards.append(self._shard.finish())
            self._shard = None
        if self._shard is None:
            index = self._start + len(self.shards)
            self._shard = ShardFile(shard_path(self.folder, self.name, index))
        self._shard.add(sample)

    def close(self) -> list[ShardInfo]:
        if self._shard is not None:
            self.shards.append(self._shard.finish())
            self._shard = None
        return list(self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif self._shard is not None:
            self._shard.abort()
            self._shard = None


# ---------------------------------------------------------------------- reading
def _split_name(name: str) -> tuple[str, str] | None:
    """ "dir/abc.seg.png" -> ("dir/abc", "seg.png"); None for a name without a field."""
    folder, _, base = name.rpartition("/")
    key, dot, field = base.partition(".")
    if not dot or not key:
        return None
    return (f"{folder}/{key}" if folder else key), field.lower()


class _CheckedInfo(tarfile.TarInfo):
    """Remembers a damaged header on its TarFile: tarfile ends a stream quietly on a header that is
    cut short, missing or garbled anywhere but at offset 0, which would pass a damaged shard as a
    short one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # the end-of-archive marker: a clean end
            raise
        except tarfile.HeaderError as err:
            kind = {"EmptyHeaderError": "ends without the end-of-archive marker"}.get(
                type(err).__name__, f"has a damaged tar header ({err})"
            )
            tarfile_.damage = f"shard {kind} at byte {tarfile_.offset}"  # type: ignore[attr-defined]
            raise


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, file:, http:, gs:, ... (not a drive letter)


def is_url(source: str | Path) -> bool:
    """Whether a shard source is opened through webdataset's gopen (`pipe:cmd`, `file:`, `http(s):`, ...)
    rather than as a local path."""
    return isinstance(source, str) and _URL.match(source) is not None


def open_shard(source: str | Path) -> IO[bytes]:
    """A binary stream of a local shard or of a URL (webdataset's gopen: `pipe:aws s3 cp s3://b/x.tar -`
    runs the command and reads its output; a command that fails raises OSError at the end)."""
    if is_url(source):
        from webdataset.gopen import gopen  # imports webdataset only when a URL is read

        return gopen(str(source), "rb")
    return open(source, "rb")  # noqa: SIM115 (closed by the caller)


def iter_tar_samples(
    source: str | Path, max_member_bytes: int | None = None
) -> Iterator[dict[str, str | bytes]]:
    """Stream the samples of one shard (a path or a URL, see `open_shard`) as {"__key__": key, field:
    bytes, ...}.

    Consecutive members with the same key form a sample. A member over `max_member_bytes` is not read:
    its sample carries "__error__" instead. Raises tarfile.TarError or OSError if the shard is
    unreadable or truncated anywhere, a header included, or its command fails, after yielding the
    samples before the damage (not the one the damage cut: it may lack members). Whatever tarfile raises
    on a crafted header is a tarfile.ReadError.
    """
    stream, finished = open_shard(source), False  # None: closed early by the consumer
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedInfo) as tar:
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
                if max_member_bytes is not None and member.size > max_member_bytes:
                    sample.setdefault("__error__", f"field {field} is {member.size} bytes, over the limit")
                    continue
                sample[field] = tar.extractfile(member).read()
            damage = getattr(tar, "damage", None)
            if sample is not None and damage is None:
                yield sample
        if damage is not None:
            raise tarfile.ReadError(damage)
        while stream.read(1 << 16):  # to the end, so that a command's exit status is checked
            pass
        finished = True
    except GeneratorExit:
        finished = None  # the consumer stopped early: a command it cut off has not failed
        raise
    except (tarfile.TarError, OSError):
        raise
    except Exception as err:  # tarfile's parsing of a crafted header (e.g. a pax sparse map) fails so
        raise tarfile.ReadError(f"damaged tar header ({type(err).__name__}: {err})") from err
    finally:
        try:
            stream.close()
        except OSError:
            if finished or (finished is False and is_url(source)):  # a failed command is the cause
                raise


def shard_error(err: BaseException) -> str:
    """A shard's error in one line; a failed `pipe:` command as its exit status, without the dump of
    its Popen arguments that webdataset puts in the message."""
    text = " ".join(str(err).split())
    status = re.fullmatch(r"\(.*\): exit (-?\d+) \(read\).*", text)
    return f"the command exited with status {status[1]}" if status else text
