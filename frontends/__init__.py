"""Frontends: bring a model into optc's IR."""

from __future__ import annotations

from pathlib import Path

from optc.frontends.onnx import load_onnx
from optc.ir import Model

from optc.errors import ModelLoadError


def load_input(path: str | Path) -> Model:
    """Load any supported input; the format follows the path (an `.onnx` file for now)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        raise ModelLoadError(
            f"{path}: is a directory; Hugging Face model directories are not supported yet, give an .onnx file"
        )
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"{path}: GGUF input is not supported yet, give an .onnx file")
    return load_onnx(path)


__all__ = ["load_input", "load_onnx"]
