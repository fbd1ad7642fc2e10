"""Memory budgets: parse `--memory-budget` sizes and probe the memory this machine can give.

`parse_size("8G")` turns a size text into bytes (a usage error when it is ill-typed);
`available_memory()` is the default budget: the memory available now (`MemAvailable` of
/proc/meminfo, else `os.sysconf`), capped by the cgroup limit of this process (cgroup v2
`memory.max`, v1 `memory/memory.limit_in_bytes`); `check_budget` refuses, in one line, a load
whose estimated peak exceeds the budget. The loaders estimate and check before they allocate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from optc.errors import OptcError

#: Binary multipliers of the size suffixes (`8G` = 8 GiB); a trailing `B`/`iB` is accepted.
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
#: cgroup v1 reports "no limit" as a huge number (page-rounded 2**63 - 1); anything above this is none.
_NO_LIMIT = 1 << 60


class MemoryBudgetExceeded(OptcError):
    """Loading (or running) would need more memory than the budget allows."""


def parse_size(text: str | int) -> int:
    """Bytes of a size such as `8G`, `512M`, `1.5G`, `4096` (suffixes are powers of 1024).

    Raises `ValueError` (one line) for anything else, zero and negative sizes included.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8G, 512M or a number of bytes)")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if match is None:
            raise ValueError(f"not a memory size: {text!r} (use e.g. 8G, 512M or a number of bytes)")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return size


def format_size(size: int) -> str:
    """A short human form: `27.0 GB`, `512.0 MB`, `60 bytes` (decimal units, as people read them)."""
    if size < 1000:
        return f"{size} bytes"
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) is not a number


def _own_cgroup_dirs(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """The folders of this process's memory cgroup (v2 unified, v1 memory), most specific first."""
    folders: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, relative = parts
        relative = relative.lstrip("/")
        if controllers == "":
            folders.append(cgroup_root / relative)
        elif "memory" in controllers.split(","):
            folders.append(cgroup_root / "memory" / relative)
    return folders


def cgroup_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None when there is none."""
    candidates: list[Path] = []
    for folder in [*_own_cgroup_dirs(cgroup_root, proc_cgroup), cgroup_root, cgroup_root / "memory"]:
        candidates += [folder / "memory.max", folder / "memory.limit_in_bytes"]
    limits = [limit for limit in (_read_int(p) for p in candidates) if limit is not None and 0 < limit < _NO_LIMIT]
    return min(limits) if limits else None


def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """`MemAvailable` (else `MemFree`) of /proc/meminfo in bytes, or None."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+):\s+(\d+)\s*kB", line)
        if match:
            fields[match.group(1)] = int(match.group(2)) * 1024
    return fields.get("MemAvailable", fields.get("MemFree"))


def sysconf_available() -> int | None:
    """Available (else physical) memory from `os.sysconf`, or None where it is not known."""
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            count, page = os.sysconf(pages), os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
        if count > 0 and page > 0:
            return count * page
    return None


def available_memory(
    *,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> int | None:
    """The memory this machine can give now: free memory, capped by the cgroup limit; None if unknown."""
    free = meminfo_available(meminfo)
    if free is None:
        free = sysconf_available()
    limit = cgroup_limit(cgroup_root, proc_cgroup)
    known = [v for v in (free, limit) if v is not None]
    return min(known) if known else None


def resolve_budget(budget: int | str | None) -> int | None:
    """A budget in bytes: an explicit size, else `available_memory()` (None when nothing is known)."""
    if budget is None:
        return available_memory()
    return parse_size(budget)


def check_budget(label: str, needed: int, budget: int | None, what: str) -> None:
    """Refuse, in one line, when `needed` bytes exceed `budget` (None: no budget known, accept)."""
    if budget is not None and needed > budget:
        raise MemoryBudgetExceeded(
            f"{label}: {what} needs about {format_size(needed)} of memory, more than the budget of "
            f"{format_size(budget)}; refusing to load it (raise it with --memory-budget)"
        )


__all__ = [
    "MemoryBudgetExceeded",
    "available_memory",
    "cgroup_limit",
    "check_budget",
    "format_size",
    "meminfo_available",
    "parse_size",
    "resolve_budget",
    "sysconf_available",
]
