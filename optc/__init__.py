"""optc: a model-compression compiler.

    frontend ──► IR ──► PassManager(pipeline) ──► backend ──► artifact + report

The sub-packages are `optc.ir`, `optc.passes`, `optc.frontends` and
`optc.backends`; `optc.compile(...)` is the one-call Python API.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# onnxruntime's telemetry writes a session file (`$TMPDIR/.ses`) on import; optc leaves nothing in
# TMPDIR and sends nothing anywhere. Set before any optc module imports onnxruntime; the user's own
# setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from optc.driver import CompileResult


def compile(model: Any, **kwargs: Any) -> CompileResult:  # noqa: A001 - the API's name, like torch.compile
    """Compile `model` (path, optc.ir.Model or torch.nn.Module); see `optc.api.compile`."""
    from optc.api import compile as _compile

    return _compile(model, **kwargs)


__all__ = ["__version__", "compile"]
