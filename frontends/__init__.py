"""Frontends: bring a model into optc's IR.

* `.onnx` file → `optc.frontends.onnx.load_onnx`;
* Hugging Face model directory or `.gguf` file → `optc.frontends.transformers.load_transformers`
  (imported on demand: it pulls in torch and transformers);
* an `nn.Module` → `optc.frontends.torch.export_module`.
"""

from __future__ import annotations

from pathlib import Path

from optc.errors import ModelLoadError
from optc.files import check_input_kind, has_gguf_magic
from optc.frontends.onnx import load_onnx
from optc.ir import Model


def load_input(path: str | Path, *, memory_budget: int | None = None, kv_cache: bool = False) -> Model:
    """Load any supported input; the format follows the path.

    `memory_budget` (bytes; None: unchecked) refuses, before anything large is allocated,
    an input whose load is estimated to need more memory. `kv_cache` exports a Hugging Face or
    GGUF causal LM with its KV cache (`optc.runtime.decoder`); an ONNX file is loaded as it is.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    check_input_kind(path, error=ModelLoadError)
    if path.is_dir() or path.suffix.lower() == ".gguf" or (path.suffix.lower() != ".onnx" and has_gguf_magic(path)):
        from optc.frontends.transformers import load_transformers

        return load_transformers(path, memory_budget=memory_budget, kv_cache=kv_cache)
    if path.suffix.lower() == ".onnx":
        return load_onnx(path, memory_budget=memory_budget)
    raise ModelLoadError(
        f"{path}: unsupported input format '{path.suffix or path.name}'; "
        "give an .onnx file, a Hugging Face model directory or a .gguf file"
    )


__all__ = ["load_input", "load_onnx"]
