"""The ONNX frontend: an `.onnx` file into the IR, weights left lazy."""

from __future__ import annotations

from pathlib import Path

from optc.ir import Model, load_model, verify


def load_onnx(path: Path, *, memory_budget: int | None = None) -> Model:
    """Load and verify an ONNX file; every failure is one `OptcError` line naming the path."""
    model = load_model(path, memory_budget=memory_budget)
    verify(model, where=f"on input {path}")
    return model
