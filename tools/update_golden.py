#!/usr/bin/env python3
"""Regenerate the exact expected sections of golden files in place (like LLVM's update_test_checks.py).

    python tools/update_golden.py                        # every tests/golden/*/*.onnxtxt
    python tools/update_golden.py tests/golden/cse       # one folder, or named files
    python tools/update_golden.py --check                # write nothing; exit 1 if stale
    python tools/update_golden.py --print tests/golden/awq [--case NAME]   # show what cases produce

Each case's input is run through the file's pipeline (with the verifier after
every pass) and its `# EXPECTED:` section is replaced by `print_ir` of the
result; a case without any expected section or CHECK line gets one. A case
marked `# EXPECTED-ERROR:` gets the first line of the error. A case that fails
without that marker, or succeeds with it, is reported and left as it is. The
diff of every change is printed: read it, the tool records what the pass does,
not what it should do.

Cases written with CHECK lines are left alone (the test suite matches them).
`--print` writes nothing: it shows each case's printed IR and its stderr and
statistics, the text that CHECK and STDERR lines match, to help write them.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.golden.golden_harness import (  # noqa: E402 - after the path set-up above
    GOLDEN_DIR,
    GoldenFormatError,
    golden_files,
    read_golden,
    render,
    run_case,
)


def update(path: Path, *, write: bool) -> tuple[bool, list[str]]:
    """Returns (whether the file is or was stale, problems that need a human)."""
    golden = read_golden(path)
    problems: list[str] = []
    outcomes = {}
    for case in golden.cases:
        if case.is_check_case:
            continue  # CHECK lines say what matters; they are written by hand
        outcome = run_case(golden.pipeline, case, golden.config)
        where = f"{path}:{case.line} ({case.name})"
        if outcome.error is not None and case.expected_error is None:
            problems.append(f"{where}: the pipeline failed: {outcome.error}")
            continue
        if outcome.error is None and case.expected_error is not None:
            problems.append(f"{where}: marked EXPECTED-ERROR but the pipeline succeeded")
            continue
        if outcome.error is not None and case.expected_error and case.expected_error in outcome.error:
            continue  # keep a hand-trimmed error message that still matches
        if outcome.error is None and outcome.modified != (outcome.text != outcome.input_printed):
            problems.append(f"{where}: warning: modified={outcome.modified} disagrees with the printed IR")
        outcomes[case.name] = outcome
    old = path.read_text()
    new = render(golden, outcomes)
    if new != old:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        sys.stdout.writelines(
            difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}")
        )
        if write:
            path.write_text(new)
    return new != old, problems


def show(path: Path, names: list[str]) -> int:
    """Print what each case (or each named one) produces; returns how many named cases were found."""
    golden = read_golden(path)
    found = 0
    for case in golden.cases:
        if names and case.name not in names:
            continue
        found += 1
        outcome = run_case(golden.pipeline, case, golden.config)
        print(f"=== {path}:{case.line} ({case.name}) modified={outcome.modified}")
        print(f"# error: {outcome.error}" if outcome.error is not None else outcome.text, end="" if outcome.error is None else "\n")
        print(f"--- stderr and statistics (what STDERR lines match)\n{outcome.stderr}", end="")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="golden files or folders (default: all)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file is stale")
    parser.add_argument("--print", action="store_true", dest="show",
                        help="write nothing; print each case's output and stderr (to write CHECK lines)")
    parser.add_argument("--case", action="append", default=[], metavar="NAME", help="with --print: only this case")
    args = parser.parse_args(argv)
    if args.case and not args.show:
        parser.error("--case goes with --print")
    files: list[Path] = []
    for path in args.paths or [GOLDEN_DIR]:
        path = path.resolve()
        files.extend(golden_files(path) if path == GOLDEN_DIR else sorted(path.glob("*.onnxtxt")) if path.is_dir() else [path])
    status = 0
    if args.show:
        found = 0
        for path in files:
            try:
                found += show(path, args.case)
            except GoldenFormatError as exc:
                print(f"error: {exc}", file=sys.stderr)
                status = 1
        if args.case and not found:
            print(f"error: no case named {', '.join(args.case)}", file=sys.stderr)
            status = 1
        return status
    for path in files:
        try:
            stale, problems = update(path, write=not args.check)
        except GoldenFormatError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        for problem in problems:
            print(problem, file=sys.stderr)
        if stale:
            print(f"{'stale' if args.check else 'updated'}: {path}", file=sys.stderr)
        status |= int(bool(problems) or (stale and args.check))
    return status


if __name__ == "__main__":
    sys.exit(main())
