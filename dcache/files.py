"""Files and folders dcache writes hold cache data (snapshots, dumps): only their owner may read them."""

from __future__ import annotations

import os
from typing import BinaryIO, cast

__all__ = ["DIR_MODE", "FILE_MODE", "open_private", "make_private_dir"]

#: Mode of the data directories dcache creates.
DIR_MODE = 0o700
#: Mode of the snapshot and dump files dcache writes.
FILE_MODE = 0o600


def open_private(path: str) -> BinaryIO:
    """Open ``path`` for binary writing, created (or truncated) with mode 0600.

    Raises:
        OSError: it cannot be created.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode through O_CREAT
    except OSError:
        os.close(fd)
        raise
    return cast(BinaryIO, os.fdopen(fd, "wb"))


def make_private_dir(path: str) -> None:
    """Create ``path`` (and its parents) with mode 0700 if it does not exist yet.

    Raises:
        OSError: it cannot be created, or exists and is not a directory.
    """
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
