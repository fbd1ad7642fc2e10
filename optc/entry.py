"""The one place that turns a command's failures into one line on stderr and an exit code."""

from __future__ import annotations

import os
import sys
import textwrap
import traceback
from collections.abc import Callable

from optc.errors import OptcError, PassFailure
from optc.messages import quiet_library_logs, without_hub_urls


def run_command(prog: str, run: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run `run(argv)`; failures print `PROG: error: ...` (after a traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        quiet_library_logs()  # e.g. onnx-ir's warning about an undefined input: the verifier names it, once
    try:
        return run(argv)
    except OptcError as exc:
        if debug:
            traceback.print_exc()
        message = without_hub_urls(str(exc))
        reproducer = getattr(exc, "reproducer", None)
        if isinstance(exc, PassFailure) and reproducer:
            message += f" (reproducer: {reproducer})"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `optc --list-passes | head`: the reader left; stop quietly (and keep Python from
        # complaining again when it flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - crashes become one line too
        if debug:
            traceback.print_exc()
        detail = textwrap.shorten(without_hub_urls(str(exc)) or type(exc).__name__, 300)
        hint = "" if debug else " (rerun with --debug for a traceback)"
        print(f"{prog}: error: internal error: {type(exc).__name__}: {detail}{hint}", file=sys.stderr)
        return 1
