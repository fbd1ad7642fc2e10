"""optc: a model-compression compiler.

    frontend ──► IR ──► PassManager(pipeline) ──► backend ──► artifact + report

The sub-packages are `optc.ir`, `optc.passes`, `optc.frontends` and `optc.backends`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
