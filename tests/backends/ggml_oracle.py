"""llama.cpp's own quantizer (`ggml_quantize_chunk` from the libggml-base that llama-cpp-python ships), for block-agreement tests."""

from __future__ import annotations

import ctypes
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
