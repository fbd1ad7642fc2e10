"""What every backend provides: a lowering, a legality check and a real-runtime check."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from optc.errors import UsageError
from optc.ir import Model
from optc.passes.infra.context import PassContext


@dataclass
class Artifact:
    """What a backend wrote and what its runtime check found."""

    path: Path
    target: str
    size_bytes: int
    checks: list[str] = field(default_factory=list)


class Backend(ABC):
    """Lower the IR to a deployable file and prove the runtime accepts it."""

    name: ClassVar[str]
    #: Output suffixes this target writes (an explicit `--target` with another suffix is a usage error).
    suffixes: ClassVar[tuple[str, ...]]
    #: Pipeline text that legalizes the IR for this target, run before `lower`.
    legalize: ClassVar[str] = ""

    @abstractmethod
    def lower(self, model: Model, output: Path, context: PassContext) -> Artifact:
        """Write `output` atomically (checked before it is moved into place)."""

    def written_files(self, output: Path, *, generation: bool = False) -> list[tuple[Path, str]]:
        """Every file `lower` may write for `output`, with what it is; the driver checks them all before any work.

        `generation`: the model is a KV-cache decoder (a backend may write what its generator needs beside it).
        """
        data = output.with_name(output.name + ".data")
        return [(output, "the output"), (data, f"its external data file {data}")]

    def check_output_suffix(self, output: Path) -> None:
        """Refuse an output whose suffix this target does not write (ONNX under a .gguf name, say)."""
        if output.suffix.lower() not in self.suffixes:
            quoted = [f"'{s}'" for s in self.suffixes]
            expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
            raise UsageError(
                f"-o {output}: --target {self.name} writes {expected} files, not '{output.suffix or output.name}'; "
                "rename the output or choose another --target"
            )


_backends: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _backends[cls.name] = cls
    return cls


#: Targets of the command-line contract, with where each comes from.
KNOWN_TARGETS = ("ort", "tensorrt", "gguf")


def get_backend(name: str) -> Backend:
    import optc.backends.gguf  # noqa: F401
    import optc.backends.ort  # noqa: F401 - registers the built-in backends
    import optc.backends.tensorrt  # noqa: F401

    if name not in KNOWN_TARGETS:
        raise UsageError(f"unknown target '{name}'; targets: {', '.join(KNOWN_TARGETS)}")
    if name not in _backends:
        raise UsageError(f"target '{name}' is not available in this version of optc; available: {', '.join(sorted(_backends))}")
    return _backends[name]()


def target_for_output(output: Path) -> str:
    """The target implied by the output's suffix (`.onnx` → ort, `.gguf` → gguf)."""
    suffix = output.suffix.lower()
    if suffix == ".onnx":
        return "ort"
    if suffix == ".gguf":
        return "gguf"
    if suffix in (".engine", ".plan"):
        return "tensorrt"
    raise UsageError(f"cannot tell the target from output suffix '{suffix or output.name}'; use --target ort|tensorrt|gguf")
