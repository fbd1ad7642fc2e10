"""Run the IR in onnxruntime with chosen intermediate values exposed as outputs.

Calibration analyses stream samples through a `ModelRunner` and reduce each
sample's activations into running statistics, so memory never grows with the
number of samples.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from optc.errors import OptcError, WriteError
from optc.ir import Model, save_model
from optc.runtime.ort import open_session


def release_free_memory() -> None:
    """Give the C allocator's free memory back to the system (glibc's `malloc_trim(0)`; nothing elsewhere).

    A calibration session's tensors and the float matrices around it are freed between blocks, but glibc
    keeps freed chunks below its (dynamic, up to 32 MiB) mmap threshold in its heaps, and the next block's
    allocations need not fit them: measured on a 1B-shaped model, the process's anonymous memory between
    blocks grew by ~400 MiB over the first blocks without this."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Callable[[int], int] | None | bool = None


class ModelRunner:
    """An onnxruntime session over a snapshot of the model that also returns `extra_outputs`."""

    def __init__(self, model: Model, extra_outputs: Sequence[str] = (), threads: int = 0) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="optc-run-")
        path = Path(self._folder.name) / "model.onnx"
        try:
            save_model(model, path, external_data=True)
        except WriteError as exc:  # name TMPDIR, not the copy that is gone by the time the user reads this
            self._folder.cleanup()
            raise OptcError(f"cannot write a copy of the model for onnxruntime in {tempfile.gettempdir()} "
                            f"({exc.reason}); set TMPDIR to a folder with room") from exc
        proto = onnx.load(str(path), load_external_data=False)
        declared = {o.name for o in proto.graph.output}
        known = {v.name for v in proto.graph.value_info}
        for name in extra_outputs:
            if name in declared:
                continue
            info = next((v for v in proto.graph.value_info if v.name == name), None) if name in known else None
            proto.graph.output.append(info if info is not None else onnx.ValueInfoProto(name=name))
        onnx.save(proto, str(path))
        self.output_names = [o.name for o in proto.graph.output]
        self.input_names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        try:
            self.session = open_session(path, optimize=False, threads=threads, arena=False)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            self.close()
            detail = (str(exc).splitlines() or [type(exc).__name__])[0].replace(str(path), "the model")
            raise OptcError(f"onnxruntime cannot run the model for calibration: {detail}") from exc

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(names) if names is not None else self.output_names
        return dict(zip(wanted, self.session.run(wanted, feed), strict=True))

    def close(self) -> None:
        self.session = None
        self._folder.cleanup()
        release_free_memory()

    def __enter__(self) -> ModelRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
