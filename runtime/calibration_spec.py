"""The `--calib` specification, parsed without importing the compiler (fast usage errors).

* `builtin`: the calibration split of Python's own `pydoc_data.topics` text
  (`optc.runtime.text`), tokenized with the model's tokenizer; the default
  for models that carry a tokenizer;
* `random`: random inputs shaped like the model's;
* `text:FILE`: a text file, tokenized with the model's tokenizer;
* `npz:FILE`: arrays by input name, the first axis indexing samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optc.errors import OptcError, UsageError

KINDS = ("builtin", "random", "text", "npz")


@dataclass(frozen=True)
class CalibrationSpec:
    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> CalibrationSpec:
        """Parse and check a spec; a missing file is an error (exit 1), a malformed spec a usage error."""
        if spec in ("builtin", "random"):
            return cls(spec)
        kind, _, file = spec.partition(":")
        if kind not in ("text", "npz") or not file:
            raise UsageError(f"--calib {spec!r}: expected builtin, random, text:FILE or npz:FILE")
        path = Path(file)
        from optc.files import check_input_kind

        check_input_kind(path, f"--calib {spec}")  # a FIFO or device would block the read
        if not path.is_file():
            raise OptcError(f"--calib {spec!r}: no such file: {file}")
        return cls(kind, path)

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"
