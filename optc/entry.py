"""The one place that turns a command's failures into one line on stderr and an exit code.

Signals: SIGINT, SIGTERM and SIGHUP raise `Interrupted` (a `KeyboardInterrupt`)
in the main thread, so the cleanup that runs on an error (temporary folders,
staged outputs, export staging) runs on a signal too; the command then exits
with 128+N. A second signal while that cleanup runs is ignored, so it
finishes. SIGXFSZ is ignored: a file-size limit makes the write fail with
EFBIG, reported like any write failure, instead of killing the process
midway.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Callable, Iterator

from optc.errors import OptcError, PassFailure
from optc.messages import quiet_library_logs, without_hub_urls

#: Signals that stop a run with its cleanup (those present on this platform).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; raised in the main thread so every `finally` cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise `Interrupted` once; signals the caller ignores stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if fired:
            return  # already unwinding: let the cleanup finish
        fired.append(signum)
        raise Interrupted(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # e.g. SIGHUP under nohup
        previous[signum] = signal.signal(signum, stop)
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_command(prog: str, run: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run `run(argv)`; failures print `PROG: error: ...` (after a traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        quiet_library_logs()  # e.g. onnx-ir's warning about an undefined input: the verifier names it, once
    with signals_as_exceptions():
        return _run_reporting(prog, run, argv, debug)


def _run_reporting(prog: str, run: Callable[[list[str]], int], argv: list[str], debug: bool) -> int:
    signum = 0
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
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
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
    # Interrupted: the traceback is gone now, so the run's temporary folders are collected here, while a
    # second signal is still ignored, rather than at interpreter exit.
    gc.collect()
    print(f"{prog}: interrupted by {signal.Signals(signum).name}; nothing was written", file=sys.stderr)
    return 128 + signum
