"""Durable file writes, defined once: what the store, key files, sealed cubes and exports share.

A write that must survive a crash goes to a temp file in the target's directory, is fsynced, renamed
over the target, and the directory is fsynced so the rename itself is durable (POSIX requires the last
step). A failure at any point removes the temp file and leaves the target as it was. No torch here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield an unbuffered binary file whose content replaces ``path`` only if the block succeeds.

    The temp file is created with ``mode`` (never wider, e.g. 0600 for private keys) and chmod'ed to it
    again in case a umask or ACL interfered.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably (see :func:`atomic_write`)."""
    with atomic_write(path, mode=mode) as f:
        f.write(data)
