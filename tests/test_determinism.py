"""Byte-for-byte determinism of whole compiles: the same input, data and seed give the same files.

One test per pipeline the issue names (`cleanup`, `w8a8`, `w4a16-fast`,
`kquant{imatrix=true}` to GGUF), each on a tiny model compiled twice into two
folders through the driver (frontend, pipeline, backend, writer): every file
written, external data included, must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from optc.driver import CompileOptions, compile_file, compile_model
from tests.fixtures import quant_models as qm
from tests.fixtures.mlp_file import build_model

CALIB = {"calib": "random", "calib_samples": 2, "calib_seqlen": 8, "seed": 7, "skip_runtime_check": True}


def _npz_options(tmp_path: Path, passes: str) -> CompileOptions:
    """Calibration from token ids within the block's vocabulary (64), two samples of 8 tokens."""
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=np.random.default_rng(3).integers(0, 64, size=(2, 8), dtype=np.int64))
    return CompileOptions(passes=passes, **{**CALIB, "calib": f"npz:{path}"})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _compile_twice(tmp_path: Path, source: Path, output: str, options: CompileOptions) -> tuple[dict, dict]:
    results = []
    for run in ("first", "second"):
        folder = tmp_path / run
        folder.mkdir()
        compile_file(source, folder / output, options)
        results.append(_files(folder))
    return results[0], results[1]


def _llama_block_file(tmp_path: Path, hidden: int = 16, ffn: int = 32) -> Path:
    """A tiny LLaMA block (tied embedding, RMSNorm, q/k/v/o, gated FFN) with its weights as external data."""
    path = tmp_path / "block.onnx"
    proto = qm.llama_block(hidden=hidden, ffn=ffn)
    onnx.save(proto, str(path), save_as_external_data=True, location="block.onnx.data", size_threshold=0)
    return path


def test_cleanup_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    source = build_model(tmp_path / "model.onnx", external_data="model.onnx.data")
    first, second = _compile_twice(tmp_path, source, "out.onnx", CompileOptions(passes="cleanup", skip_runtime_check=True))
    assert first == second and sorted(first) == ["out.onnx", "out.onnx.data"]


def test_w8a8_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    source = _llama_block_file(tmp_path)
    first, second = _compile_twice(tmp_path, source, "out.onnx", _npz_options(tmp_path, "w8a8"))
    assert first == second and sorted(first) == ["out.onnx", "out.onnx.data"]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "first" / "out.onnx")).graph.node)


def test_w4a16_fast_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    source = _llama_block_file(tmp_path, hidden=128, ffn=256)  # K of 128: one full 4-bit group
    first, second = _compile_twice(tmp_path, source, "out.onnx", _npz_options(tmp_path, "w4a16-fast"))
    assert first == second and sorted(first) == ["out.onnx", "out.onnx.data"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "first" / "out.onnx")).graph.node}
    assert ops & {"MatMulNBits", "DequantizeLinear"}


def test_kquant_with_an_imatrix_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("torch")
    from tests.fixtures.gguf_models import ir_like_frontend, tiny_hf_llama

    written = []
    for run in ("first", "second"):
        folder = tmp_path / run
        folder.mkdir()
        model = ir_like_frontend(*tiny_hf_llama())
        compile_model(model, folder / "out.gguf", CompileOptions(passes="kquant{mix=Q4_K_M imatrix=true}", **CALIB))
        written.append(_files(folder))
    assert written[0] == written[1] and list(written[0]) == ["out.gguf"]
    assert np.frombuffer(written[0]["out.gguf"][:4], np.uint8).tobytes() == b"GGUF"
