"""One running job per output: a second ``minitron`` call on an output a live job is writing is
refused instead of both resuming from the same checkpoint and writing the same files.

The lock is an ``flock`` on a file named after the output's resolved path under the system's
temporary directory (not inside the output, which some stages require to be new or empty), held
by rank 0 from the end of the checks to the end of the stage; the kernel drops it when the
process ends, however it ends. It covers jobs on one machine (a node-local lock directory);
jobs started on different nodes of a cluster are not seen.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path


def lock_path(output) -> Path:
    key = hashlib.sha256(str(Path(output).expanduser().resolve()).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / "nemo_minitron-locks" / f"{key}.lock"


def acquire(output, field: str = "output") -> int:
    """Take ``output``'s lock; returns the descriptor that holds it (for :func:`release`).
    ``ValueError`` naming the job that holds it."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"{field}={output} is in use by another running minitron job (pid "
                         f"{holder}); wait for it to end, stop it, or choose another "
                         f"{field}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock
