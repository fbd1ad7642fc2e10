"""llama.cpp's own quantizers, for block-agreement tests and benchmarks.

`ggml_quantize_chunk` from the libggml-base that llama-cpp-python ships, and
`llama_quantize` (the `llama-quantize` tool's `llama_model_quantize`, with an
optional importance matrix).
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np


def load_ggml() -> ctypes.CDLL | None:
    """The ggml base library bundled with llama-cpp-python, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    folder = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (folder / name).exists():
            lib = ctypes.CDLL(str(folder / name))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ]
            return lib
    return None


def ggml_quantize(lib: ctypes.CDLL, rows: np.ndarray, qtype: int, row_bytes: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`ggml_quantize_chunk(qtype, rows, ...)`: uint8 `[n_rows, row_bytes]`."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.zeros((rows.shape[0], row_bytes), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1],
        None if qw is None else qw.ctypes.data,
    )
    return out


def llama_quantize(src: Path, dst: Path, mix: str, *, threads: int = 1, imatrix: dict[str, np.ndarray] | None = None) -> float:
    """llama.cpp's quantizer (`llama_model_quantize`) from `src` to the `mix` in `dst`; returns the wall time.

    `imatrix` maps tensor names to their importance columns (mean x²), as
    `llama-imatrix` writes them. Raises ImportError without llama-cpp-python
    and RuntimeError when llama.cpp fails.
    """
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    from optc.backends.gguf import FILE_TYPES

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[mix]
    params.nthread = threads
    keep = []  # the arrays the ctypes entries point into stay alive until the call returns
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, column) in enumerate(sorted(imatrix.items())):
            data = np.ascontiguousarray(column, dtype=np.float32)
            keep.append(data)
            entries[i].name = name.encode()
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
    start = time.perf_counter()
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({mix}) failed with {rc}")
    return elapsed
