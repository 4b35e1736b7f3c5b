"""Write a file so that it is either complete or absent: into a temporary file beside it, then a
rename. Every writer of the project (configs, checkpoints, images, clips, plots) goes through here.

    with atomic_path("out/grid.png") as tmp:
        image.save(tmp, format="PNG")
    write_atomic("run/config.yaml", text)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (created if needed); on success it replaces `path`,
    on any error it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def usual_permissions(folder: str | Path) -> Path:
    """Give a folder made with mkdtemp (0700) and the files in it the permissions a plain mkdir and
    open would have, before it is published by rename."""
    folder = Path(folder)
    mask = _umask()
    for item in folder.iterdir():
        if item.is_file():
            os.chmod(item, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
