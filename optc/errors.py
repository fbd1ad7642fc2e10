"""Error types shared by every part of optc.

Each error carries one line for the user. The command line maps `UsageError` to
exit code 2 and every other `OptcError` to exit code 1.
"""

from __future__ import annotations


class OptcError(Exception):
    """A failure the user can act on; its message is one clear line."""

    exit_code = 1


class UsageError(OptcError):
    """A bad command line or pipeline: unknown pass, unknown or ill-typed option, syntax."""

    exit_code = 2


class PipelineSyntaxError(UsageError):
    """A pipeline string that does not parse; names the 1-based column."""

    def __init__(self, message: str, text: str, column: int) -> None:
        self.text = text
        self.column = column
        super().__init__(f"pipeline syntax error at column {column}: {message}")


class ModelLoadError(OptcError):
    """An input model that is missing, unreadable or not a valid model."""


class WriteError(OptcError):
    """A file could not be written (full disk, file-size limit, read-only folder); nothing was kept."""

    def __init__(self, path: object, exc: OSError) -> None:
        self.path = path
        self.reason = exc.strerror or str(exc) or type(exc).__name__
        super().__init__(f"{path}: cannot write ({self.reason}); nothing was written")


class MissingCalibrationData(OptcError):
    """A pass needs calibration data and none was named; input, not a compiler bug (no reproducer)."""


class BadCalibrationData(OptcError):
    """Calibration data that does not fit the model (names, dtypes, shapes, values); input, not a compiler bug."""


class VerificationError(OptcError):
    """The IR broke one of its invariants; lists every problem found."""

    def __init__(self, problems: list[str], where: str = "") -> None:
        self.problems = problems
        prefix = f"IR verification failed{(' ' + where) if where else ''}"
        shown = "; ".join(problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{prefix}: {shown}{more}")


class PassFailure(OptcError):
    """A pass raised; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, cause: BaseException, before: list[str]) -> None:
        self.pass_name = pass_name
        self.cause = cause
        self.before = before
        ran = f" (after {', '.join(before)})" if before else ""
        detail = str(cause) or type(cause).__name__
        super().__init__(f"pass '{pass_name}' failed{ran}: {detail}")


class PreconditionError(OptcError):
    """A pass's `requires` check did not hold on its input."""


class PostconditionError(OptcError):
    """A pass's `ensures` check did not hold on its output."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
