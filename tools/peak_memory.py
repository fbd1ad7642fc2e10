#!/usr/bin/env python3
"""Peak memory of a command, measured in a cgroup v1 memory group of its own (optionally capped).

Peak RSS counts memory-mapped pages of files (weights read through mmap), which the kernel can drop
again; this tool measures in a memory cgroup instead: it creates `/sys/fs/cgroup/memory/optc-peak-PID`,
writes the cap (if any) to `memory.limit_in_bytes`, starts the command inside it, samples the group's
anonymous memory (`total_rss` of `memory.stat`) every `--interval` seconds, and reports

* `peak_anon`: the largest anonymous memory seen (heap, numpy and torch buffers: what cannot be dropped);
* `max_usage`: `memory.max_usage_in_bytes` (anonymous memory plus the page cache the group touched);
* the exit code (137 when the cap killed it) and the wall time.

The group is removed afterwards. Needs a writable cgroup v1 memory controller.

    python tools/peak_memory.py -- optc --passes='rtn{bits=8 group=128}' -o /tmp/w8.onnx
    python tools/peak_memory.py --cap 1.5G -- optc --passes='rtn{bits=8 group=128}' --memory-budget 2G -o /tmp/w8.onnx
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


#: `memory.stat` fields a trace line gives after the anonymous memory (page cache, its dirty part, the part
#: being written back, the part mapped into the process), in MiB.
TRACE_FIELDS = ("total_cache", "total_dirty", "total_writeback", "total_mapped_file")


def _stat(group: Path) -> dict[str, int]:
    stat = {}
    for line in (group / "memory.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key.startswith("total_"):
            stat[key] = int(value)
    return stat


def _anon(group: Path) -> int:
    return _stat(group).get("total_rss", 0)


def measure(command: list[str], cap: int | None = None, interval: float = 0.05,
            env: dict[str, str] | None = None, trace: Path | None = None) -> tuple[int, float, int, int]:
    """Run `command` in a memory cgroup of its own (capped at `cap` bytes when given); returns
    (exit code, wall seconds, peak anonymous bytes, `memory.max_usage_in_bytes`). With `trace`, every
    sample is also written there as a line `SECONDS ANON_MIB CACHE_MIB DIRTY_MIB WRITEBACK_MIB MAPPED_MIB` (to
    see which part of a run holds the peak, and how much of `max_usage` is page cache)."""
    group = ROOT / f"optc-peak-{os.getpid()}"
    group.mkdir()
    try:
        if cap is not None:
            (group / "memory.limit_in_bytes").write_text(str(cap))
        start = time.perf_counter()

        def enter() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

        child = subprocess.Popen(command, preexec_fn=enter, env=env)
        peak = 0
        log = trace.open("w") if trace is not None else None
        try:
            while child.poll() is None:
                stat = _stat(group)
                anon = stat.get("total_rss", 0)
                peak = max(peak, anon)
                if log is not None:
                    rest = " ".join(f"{stat.get(k, 0) / 2**20:.0f}" for k in TRACE_FIELDS)
                    log.write(f"{time.perf_counter() - start:.2f} {anon / 2**20:.0f} {rest}\n")
                    log.flush()
                time.sleep(interval)
        finally:
            if log is not None:
                log.close()
        seconds = time.perf_counter() - start
        max_usage = int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        for _ in range(50):  # the group empties once the child is reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return child.returncode, seconds, peak, max_usage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=_size, default=None, help="memory.limit_in_bytes, e.g. 1.5G (default: none)")
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--trace", type=Path, default=None, help="write every sample (seconds, then anon, cache, dirty, writeback, mapped_file in MiB) to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    returncode, seconds, peak, max_usage = measure(command, args.cap, args.interval, trace=args.trace)
    cap = f"{args.cap / 2**30:.2f} GiB" if args.cap is not None else "none"
    print(f"peak_memory: exit {returncode}, {seconds:.1f} s, cap {cap}, peak_anon {peak / 2**20:.0f} MiB, "
          f"max_usage {max_usage / 2**20:.0f} MiB", flush=True)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
