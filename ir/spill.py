"""A spill file: rewritten weights moved out of RAM into a file beside the output, memory-mapped back.

A pass that rewrites a weight holds the new tensor in memory (`optc.ir.Tensor`). `SpillFile.spill(model)`
appends every such initializer of at least `min_bytes` to one file (64 KiB aligned, as the ONNX
writer aligns external data) and replaces it by an `ExternalTensor` over that file: the kernel then
pages it in when a pass or the writer reads it, and can drop the pages again under memory pressure.
Spilled tensors do not count as the model's own external data (`is_spilled`), so whether a model is
saved with external data, and the bytes saved, are the same with and without spilling.

The file is the run's own temporary: `close()` deletes it (the driver does so on every exit path).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from optc.ir.core import DataType, ExternalTensor, Graph, LazyTensor, Model, Value

#: Spilled tensors start at multiples of this many bytes.
SPILL_ALIGNMENT = 1 << 16
#: Smaller tensors stay in memory (scales, zero points, shapes).
SPILL_MIN_BYTES = 1 << 10

#: Paths of the spill files open in this process.
_OPEN: set[str] = set()
#: The spill file attached to a graph (by id), which the IR builder writes new initializers to at once.
_ATTACHED: dict[int, SpillFile] = {}


def attach(model: Model, spill: SpillFile) -> None:
    """From now on, initializers the IR builder (`optc.ir.patterns.builder`) creates in `model` go to `spill`
    as they are made, so a pass that rewrites layer after layer holds one layer's new weights at a time."""
    _ATTACHED[id(model.graph)] = spill


def detach(model: Model) -> None:
    _ATTACHED.pop(id(model.graph), None)


def attached(graph: Graph) -> SpillFile | None:
    """The spill file attached to `graph`, if any."""
    return _ATTACHED.get(id(graph))


def is_spilled(tensor: object) -> bool:
    """True for a tensor `SpillFile.spill` moved to its file."""
    return isinstance(tensor, ExternalTensor) and os.fspath(tensor.path) in _OPEN


def in_memory_bytes(model: Model) -> int:
    """Bytes of the initializers held in memory (neither memory-mapped external data, spilled, nor read
    lazily from the input's files)."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None and not isinstance(value.const_value, ExternalTensor | LazyTensor)
        and value.const_value.dtype != DataType.STRING
    )


class SpillFile:
    """One append-only spill file in `folder` (created on first use, deleted by `close`)."""

    def __init__(self, folder: str | os.PathLike, stem: str = "optc", *, min_bytes: int = SPILL_MIN_BYTES) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.min_bytes = min_bytes
        self.path: Path | None = None
        self.bytes_spilled = 0
        self.tensors_spilled = 0
        self._file = None
        self._end = 0

    def _open(self) -> None:
        fd, name = tempfile.mkstemp(prefix=f".{self.stem}.", suffix=".spill", dir=self.folder)
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name).absolute()
        _OPEN.add(os.fspath(self.path))

    def spill(self, model: Model) -> int:
        """Move every in-memory initializer of at least `min_bytes` to the file; returns the bytes moved."""
        return sum(self.spill_value(value) for value in model.graph.initializers.values())

    def spill_value(self, value: Value) -> int:
        """Move one initializer's tensor to the file when it is in memory and at least `min_bytes`; the bytes moved."""
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ExternalTensor | LazyTensor) or tensor.dtype == DataType.STRING:
            return 0  # mapped, spilled, or read from the input's files when needed: not in memory
        if tensor.nbytes < self.min_bytes:
            return 0
        if self._file is None:
            self._open()
        offset = -(-self._end // SPILL_ALIGNMENT) * SPILL_ALIGNMENT
        data = tensor.tobytes()
        self._file.seek(offset)
        self._file.write(data)
        self._file.flush()
        self._end = offset + len(data)
        value.const_value = ExternalTensor(
            os.fspath(self.path), offset, len(data), tensor.dtype, shape=tensor.shape,
            name=tensor.name or value.name, doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props) or None,
        )
        self.tensors_spilled += 1
        self.bytes_spilled += len(data)
        return len(data)

    def close(self) -> None:
        """Delete the file (tensors still mapped from it stay readable until they are let go)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            _OPEN.discard(os.fspath(self.path))
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SPILL_ALIGNMENT", "SPILL_MIN_BYTES", "SpillFile", "attach", "attached", "detach", "in_memory_bytes", "is_spilled"]
