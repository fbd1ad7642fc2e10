"""Builders of hostile weight files and a child run that measures its peak memory (shared by the loader tests)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.cli.cli_support import _env, optc_command

#: What a child optc may use for an input under 1 MB (the issue's bound), in KiB as ru_maxrss reports it.
PEAK_RSS_LIMIT_KIB = 1 << 20


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(
    metadata: dict[str, str | int], tensors: list[tuple[str, list[int], int, int]] = (), data: bytes = b"",
    *, tensor_count: int | None = None,
) -> bytes:
    """A GGUF v3 file: string or uint32 metadata, tensor infos (name, ggml dims, ggml type, offset), data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if tensor_count is None else tensor_count, len(metadata))
    for key, value in metadata.items():
        out += gguf_string(key)
        out += struct.pack("<I", 8) + gguf_string(value) if isinstance(value, str) else struct.pack("<II", 4, value)
    for name, dims, ggml_type, offset in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, offset)
    if data:
        out += b"\0" * (-len(out) % 32) + data
    return out


def safetensors_bytes(tensors: dict[str, np.ndarray], *, lie: dict[str, dict] | None = None) -> bytes:
    """A safetensors file; `lie` overrides fields of a tensor's header entry."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        header[name].update((lie or {}).get(name, {}))
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def run_measured(args: list[str], cwd: Path) -> tuple[int, list[str], int]:
    """Run optc in a fresh parent that reports its children's peak RSS: (exit code, stderr lines, peak KiB)."""
    probe = (
        "import resource, subprocess, sys\n"
        "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL)\n"
        "sys.stderr.write(proc.stderr)\n"
        "print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *optc_command(), *args], cwd=cwd, env=_env(()),
        capture_output=True, text=True, timeout=300,
    )
    code, peak = (int(v) for v in done.stdout.split())
    return code, done.stderr.splitlines(), peak
