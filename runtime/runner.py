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
from onnx_ir import serde

from optc.errors import OptcError, WriteError, first_line
from optc.ir import DataType, ExternalTensor, Model, save_model
from optc.ir.core import TensorProtocol
from optc.ir.io import all_tensor_protos
from optc.runtime.ort import open_session


def release_free_memory() -> None:
    """Give the C allocator's free memory back to the system (glibc's `malloc_trim(0)`; nothing elsewhere).

    A calibration session's tensors and the float matrices around it are freed between blocks, but glibc
    keeps freed chunks below its (dynamic, up to 32 MiB) mmap threshold in its heaps. Measured on the
    synthetic 1B's w4a16 block path: the anonymous memory at the start of each block's session rose
    259, 652, 711, 839 MiB over the first blocks with onnxruntime's arena and no trim; with the arena
    off and this on each close it stayed at ~335 MiB.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Callable[[int], int] | None | bool = None


def stored_bytes(tensor: TensorProtocol) -> bytes:
    """A tensor's bytes as ONNX stores them (4-bit values packed two to a byte); an `ExternalTensor`'s are read
    from its file and the tensor is left unloaded.

    onnx-ir's `ExternalTensor.tobytes()` loads the tensor first, which for a 4-bit type unpacks it into an
    anonymous array of a byte per value that the tensor then keeps. Each 4-bit block that a block-by-block
    calibration runs again after GPTQ inlined its codes this way, so a 1B model's unpacked codes piled up in RAM
    block after block (~40 MiB a block)."""
    if not isinstance(tensor, ExternalTensor):
        return tensor.tobytes()
    length = tensor.length if tensor.length is not None else tensor.nbytes
    with open(tensor.path, "rb") as file:
        file.seek(tensor.offset or 0)
        data = file.read(length)
    if len(data) != length:
        raise OptcError(f"{tensor.path}: {tensor.name or 'a weight'} needs {length} bytes at offset "
                        f"{tensor.offset or 0}, the file has {len(data)} there")
    return data


#: Initializers of at least this many bytes, of a type numpy holds as ONNX stores it, are fed to the
#: session as inputs (`ModelRunner`) instead of being written to a copy of the model.
FEED_MIN_BYTES = 1 << 16
_FED_TYPES = frozenset({
    DataType.FLOAT, DataType.DOUBLE, DataType.FLOAT16, DataType.INT8, DataType.UINT8, DataType.INT16,
    DataType.UINT16, DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64, DataType.BOOL,
})


class ModelRunner:
    """An onnxruntime session over a snapshot of the model that also returns `extra_outputs`.

    The model goes to onnxruntime as bytes in memory without its large weights: each initializer of at
    least `FEED_MIN_BYTES` (of a numpy type) becomes a graph input that `run` feeds with the IR's own array
    (memory-mapped from the input's or the spill file's data, or the in-memory array), which onnxruntime
    reads in place. Nothing is written: a calibration block of a 1B model used to write its ~200 MB of
    weights to a temporary file per session, dirty page cache charged to a memory cgroup. The smaller
    initializers are inline in the bytes. A model whose graph still has external data elsewhere (a
    subgraph's) is written to a temporary copy as before. The values computed are the same either way
    (onnxruntime runs without graph optimizations or prepacking, so a weight is read, never folded)."""

    def __init__(self, model: Model, extra_outputs: Sequence[str] = (), threads: int = 0) -> None:
        self._folder: tempfile.TemporaryDirectory | None = None
        self._fed: dict[str, np.ndarray] = {}
        proto = self._in_memory(model)
        if proto is None:
            proto = self._on_disk(model)
        declared = {o.name for o in proto.graph.output}
        known = {v.name for v in proto.graph.value_info}
        for name in extra_outputs:
            if name in declared:
                continue
            info = next((v for v in proto.graph.value_info if v.name == name), None) if name in known else None
            proto.graph.output.append(info if info is not None else onnx.ValueInfoProto(name=name))
        self.output_names = [o.name for o in proto.graph.output]
        skip = {t.name for t in proto.graph.initializer} | set(self._fed)
        self.input_names = [i.name for i in proto.graph.input if i.name not in skip]
        path = Path(self._folder.name) / "model.onnx" if self._folder is not None else None
        try:
            if path is not None:
                onnx.save(proto, str(path))
            source = path if path is not None else proto.SerializeToString()
            del proto
            self.session = open_session(source, optimize=False, threads=threads, arena=False)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            self.close()
            detail = first_line(exc, limit=None)
            detail = detail.replace(str(path), "the model") if path is not None else detail
            raise OptcError(f"onnxruntime cannot run the model for calibration: {detail}") from exc

    def _in_memory(self, model: Model) -> onnx.ModelProto | None:
        """The model's proto with the large weights as graph inputs (their arrays in `self._fed`) and the
        other initializers inline; None when external data would be left in it."""
        fed = {name: value for name, value in model.graph.initializers.items()
               if value.const_value is not None and value.const_value.dtype in _FED_TYPES
               and value.const_value.nbytes >= FEED_MIN_BYTES}
        swapped = []
        try:  # a placeholder for each fed weight, so serializing reads none of them
            for value in fed.values():
                tensor = value.const_value
                swapped.append((value, tensor))
                value.const_value = ExternalTensor("optc-fed", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                   name=tensor.name or value.name)
            proto = serde.serialize_model(model)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
        kept = []
        inputs = {i.name for i in proto.graph.input}
        for tensor in proto.graph.initializer:
            if tensor.name in fed:
                if tensor.name not in inputs:  # (an initializer may also be a graph input, with a default)
                    proto.graph.input.append(
                        onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
                continue
            if tensor.data_location == onnx.TensorProto.EXTERNAL:  # small or of a packed type: inline
                data = stored_bytes(model.graph.initializers[tensor.name].const_value)
                tensor.ClearField("external_data")
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = data
            kept.append(tensor)
        if len(kept) != len(proto.graph.initializer):
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(kept)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t, _ in all_tensor_protos(proto)):
            return None
        self._fed = {name: np.ascontiguousarray(value.const_value.numpy()) for name, value in fed.items()}
        return proto

    def _on_disk(self, model: Model) -> onnx.ModelProto:
        """A temporary copy of the model with external data (its proto, weights not loaded)."""
        self._folder = tempfile.TemporaryDirectory(prefix="optc-run-")
        path = Path(self._folder.name) / "model.onnx"
        try:
            save_model(model, path, external_data=True)
        except WriteError as exc:  # name TMPDIR, not the copy that is gone by the time the user reads this
            self._folder.cleanup()
            raise OptcError(f"cannot write a copy of the model for onnxruntime in {tempfile.gettempdir()} "
                            f"({exc.reason}); set TMPDIR to a folder with room") from exc
        return onnx.load(str(path), load_external_data=False)

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = list(names) if names is not None else self.output_names
        if self._fed:
            feed = {**feed, **self._fed}
        return dict(zip(wanted, self.session.run(wanted, feed), strict=True))

    def close(self) -> None:
        self.session = None
        self._fed = {}
        if self._folder is not None:
            self._folder.cleanup()
        release_free_memory()

    def __enter__(self) -> ModelRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
