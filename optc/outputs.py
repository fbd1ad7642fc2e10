"""What a run writes, checked against what it reads before any work, and removed again if the run fails.

Every file a compile may write (the output, its external data, the engine and
the ONNX beside it, the trtexec command file, the report files, the
reproducer) is declared up front as a `Written` entry. `check_writes` refuses,
before anything is loaded or written, any of them that

* is a folder, or sits in a folder that does not exist or cannot be written;
* is an input file, a data file an input refers to (external data), or any
  path inside an input directory, or a folder holding an input;
* is another file of the same run (the report on top of the output).

Paths are compared both as the directory entry a writer replaces (the
folder resolved, the name kept: a writer renames over a symbolic link, not
through it) and as the file they finally name (symbolic links followed), and
existing files by inode too (hard links).

`RunFiles` remembers what each declared path was before the run; `discard()`
removes those this run created or replaced, so a run that fails after its
backend moved the output into place (a report that cannot be written, a
failed `--compare`, a signal) still leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from optc.errors import OptcError

#: At most this many entries of an input directory are listed to find files its symbolic links name.
MAX_DIRECTORY_ENTRIES = 10_000


class Written(NamedTuple):
    """One file a run may write: its path, the flag that named it, and what it is (for messages)."""

    path: Path
    #: How the user named it: the output path, or `--report FILE`.
    flag: str
    #: What this file is, e.g. "the output" or "its external data file out.onnx.data".
    what: str


@dataclasses.dataclass
class Inputs:
    """What a run reads and must never write: files (with what they are) and directories."""

    files: dict[Path, str] = dataclasses.field(default_factory=dict)
    directories: dict[Path, str] = dataclasses.field(default_factory=dict)

    def add_file(self, path: Path, what: str) -> None:
        for form in _forms(path):
            self.files.setdefault(form, what)

    def add_directory(self, path: Path, what: str) -> None:
        for form in _forms(path):
            self.directories.setdefault(form, what)
        # Files the directory's links point to (a Hugging Face cache snapshot links to its blobs).
        for count, entry in enumerate(_walk(path)):
            if count >= MAX_DIRECTORY_ENTRIES:
                break
            if entry.is_symlink():
                target = entry.resolve()
                if target.is_dir():
                    self.directories.setdefault(target, f"a folder linked from the input directory {path}")
                else:
                    self.files.setdefault(target, f"a file of the input directory {path}")

    @classmethod
    def of_path(cls, path: Path) -> Inputs:
        """The input named on the command line: a file, or a directory and everything in it."""
        inputs = cls()
        if path.is_dir():
            inputs.add_directory(path, f"the input directory {path}")
        else:
            inputs.add_file(path, f"the input {path}")
        return inputs

    def merge(self, other: Inputs) -> Inputs:
        for path, what in other.files.items():
            self.files.setdefault(path, what)
        for path, what in other.directories.items():
            self.directories.setdefault(path, what)
        return self


def _walk(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            yield Path(root) / name


def _entry(path: Path) -> Path:
    """The directory entry a writer replaces: the folder resolved, the name kept."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent.resolve() / absolute.name


def _forms(path: Path) -> set[Path]:
    return {_entry(path), Path(path).resolve()}


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else None


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def check_writes(writes: list[Written], inputs: Inputs) -> None:
    """Refuse, with one line, a declared write that would touch an input or cannot happen (see module doc)."""
    input_inodes = {inode: what for path, what in inputs.files.items() if (inode := _inode(path)) is not None}
    seen: dict[Path, Written] = {}
    for write in writes:
        prefix = f"{write.flag}: {write.what}"
        forms = _forms(write.path)
        for form in forms:
            if form in inputs.files:
                raise OptcError(f"{prefix} would overwrite {inputs.files[form]}; choose another path")
            for folder, what in inputs.directories.items():
                if _inside(form, folder):
                    raise OptcError(f"{prefix} would be written inside {what}; choose a path outside it")
            for path, what in inputs.files.items():
                if _inside(path, form):
                    raise OptcError(f"{prefix} is a folder holding {what}; choose another path")
        inode = _inode(write.path)
        if inode is not None and inode in input_inodes:
            raise OptcError(f"{prefix} is the same file as {input_inodes[inode]} (a link); choose another path")
        for form in forms:
            if form in seen and seen[form] is not write:
                other = seen[form]
                raise OptcError(f"{prefix} would overwrite {other.what} of {other.flag}; choose another path")
            seen[form] = write
        if write.path.is_dir():
            raise OptcError(f"{prefix} is a directory; give a file's path")
        folder = write.path.parent if str(write.path.parent) else Path(".")
        if not folder.is_dir():
            raise OptcError(f"{write.flag}: output folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OptcError(f"{write.flag}: output folder {folder} is not writable")


class RunFiles:
    """The files a run declared; removes the ones it created or replaced when the run fails."""

    def __init__(self, writes: Iterable[Written]) -> None:
        self.writes = list(writes)
        self._before = {w.path: _identity(w.path) for w in self.writes}

    def check(self, inputs: Inputs) -> None:
        check_writes(self.writes, inputs)

    def changed(self) -> list[Path]:
        """Declared files this run created or replaced so far."""
        return [path for path, before in self._before.items() if (now := _identity(path)) is not None and now != before]

    def discard(self, keep: Iterable[Path] = ()) -> None:
        """Remove every declared file this run created or replaced, except `keep`."""
        kept = {Path(p) for p in keep}
        for path in self.changed():
            if path not in kept:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


__all__ = ["Inputs", "RunFiles", "Written", "check_writes"]
