"""Backends: lower the IR for a runtime and check the result on that runtime."""

from optc.backends.base import Artifact, Backend, get_backend, register_backend, target_for_output

__all__ = ["Artifact", "Backend", "get_backend", "register_backend", "target_for_output"]
