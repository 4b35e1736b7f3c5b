"""One training job per `run.dir`: an advisory `fcntl.flock` on `<run.dir>/.lock`, held for the whole run.

    with hold_run_dir(run_dir, dist, device):   # RunLocked (exit 2) when another live job holds it
        ...

Two jobs in one run.dir would interleave metrics.jsonl, write the same checkpoint step into one
temporary folder and prune each other's checkpoints. The lock is taken before anything under run.dir is
read or written, so a second launch changes nothing (not the checkpoints, not metrics.jsonl, not a save
in progress). The file records its holder (pid, host, start time) for the error message.

Why flock: the kernel drops the lock when the holding process dies, however it dies (SIGKILL, OOM), so
there is no stale lock to clean up and the file is never deleted (deleting it would let a newcomer lock
a fresh inode while the old holder still holds the unlinked one). Limits: the lock is advisory (only
this code checks it); on NFS, flock is emulated with POSIX locks through the lock manager (Linux >=
2.6.12) and is only as reliable as that; on filesystems without locking the run stops rather than
running unprotected. DataLoader workers forked by the run (data.num_workers > 0) share the open lock, so
after a SIGKILL of the trainer the lock goes when they notice and exit (seconds).

With several processes rank 0 takes the lock, and all ranks agree (`distributed.any_rank`) to stop
together when it cannot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from selfflow.training.distributed import Dist, any_rank

LOCK = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunLocked(RuntimeError):
    """run.dir is in use by another live training job (or cannot be locked at all)."""


def _holder(fd: int) -> str:
    """The holder recorded in an open lock file, in words."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {record['pid']} on host {record['host']} (since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "another process"


class RunLock:
    """The flock on `<run_dir>/.lock`; `acquire` raises RunLocked naming the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(f"run.dir {self.run_dir} is in use by {holder}") from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_LOCKS:
                raise RunLocked(
                    f"cannot lock {self.path}: {e.strerror} (a filesystem without flock?)"
                ) from None
            raise
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clear the record and drop the lock (the file stays: see the module docstring)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, dist: Dist, device: torch.device) -> Iterator[None]:
    """Rank 0 holds the lock for the block; every rank raises RunLocked when rank 0 could not take it."""
    lock, error = RunLock(run_dir), None
    if dist.is_main:
        try:
            lock.acquire()
        except RunLocked as e:
            error = e
    if any_rank(dist, error is not None, device):
        raise error or RunLocked(f"run.dir {run_dir} is in use (rank 0 could not lock it)")
    try:
        yield
    finally:
        lock.release()
