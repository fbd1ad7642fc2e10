"""What kind of file a path is: its file type checked without opening it (a FIFO or a device would block a read), its format by its first bytes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from optc.errors import OptcError


def check_input_kind(path: Path, label: str | None = None, error: type[OptcError] = OptcError) -> None:
    """Refuse (raising `error`), without opening it, an input that is neither a regular file nor a directory
    (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the loader names it
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise error(f"{label or path}: is {kind}, not a regular file or a directory")


def has_gguf_magic(path: Path) -> bool:
    """The file starts with GGUF's magic bytes (False when it cannot be read)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
