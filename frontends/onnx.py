"""The ONNX frontend: an `.onnx` file into the IR, weights left lazy."""

from __future__ import annotations

from pathlib import Path

from optc.ir import Model, load_model, verify


def load_onnx(path: Path) -> Model:
    """Load and verify an ONNX file; every failure is one `OptcError` line naming the path."""
    model = load_model(path)
    verify(model, where=f"on input {path}")
    return model
