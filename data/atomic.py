"""Write a file so that it is either complete or absent: into a temporary file beside it, then a
rename. Every writer of the project (configs, checkpoints, images, clips, plots) goes through here.

    with atomic_path("out/grid.png") as tmp:
        image.save(tmp, format="PNG")
    write_atomic("run/config.yaml", text)
    write_atomic("ckpt/latest", name, durable=True)   # also survives a power loss once it returns

A rename alone is atomic against a crash of the process, not against a power loss: the new name may
reach the disk before the data does. `durable=True` fsyncs the file before the rename and its folder
after it (`fsync_dir`), which is what checkpoints need; images and plots skip that cost.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush a file's data and size to the disk (os.fsync through a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to the disk. A no-op where the
    platform cannot open folders (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (created if needed); on success it replaces `path`,
    on any error it is deleted and `path` is left as it was. `durable`: fsync the file before the rename
    and the folder after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically (`durable`: see `atomic_path`)."""
    with atomic_path(path, durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def usual_permissions(folder: str | Path) -> Path:
    """Give a folder made with mkdtemp (0700) and the files in it the permissions a plain mkdir and
    open would have (subfolders included), before it is published by rename."""
    folder = Path(folder)
    mask = _umask()
    for item in folder.rglob("*"):
        if item.is_file():
            os.chmod(item, 0o666 & ~mask)
        elif item.is_dir():
            os.chmod(item, 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
