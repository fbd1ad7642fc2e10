"""The `optc` command line.

    optc INPUT -o OUTPUT [--passes PIPELINE] [--target ort|tensorrt|gguf] ...
    optc --list-passes
    optc --print-pipeline --passes PIPELINE

Exit codes: 0 success, 2 usage error, 1 any other failure, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optc import __version__
from optc.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="optc",
        allow_abbrev=False,  # flags are a contract: '--deb' is an unknown flag, not '--debug'
        description="optc: a model-compression compiler (frontend -> pass pipeline -> backend).",
        epilog="Example: optc model.onnx --passes='dce,cse,fold-constants' -o out.onnx",
    )
    parser.add_argument(
        "input", nargs="?",
        help="model to compile: .onnx file, Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("-o", "--output", type=Path, help="where to write the result (the suffix picks the target)")
    parser.add_argument("--passes", help="pipeline text, e.g. 'dce,cse,fold-constants' (default: cleanup)")
    parser.add_argument("--target", choices=["ort", "tensorrt", "gguf"], help="backend (default: from the output suffix)")
    parser.add_argument("--calib", help="calibration data: builtin, random, text:FILE or npz:FILE (required by passes that calibrate; builtin is the default for the default model)")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument(
        "--calib-blocks", choices=("auto", "on", "off"), default="auto",
        help="calibrate a decoder block by block (one block's weights and statistics in memory; gptq then runs "
             "true-sequential): on, off, or auto (default: when the whole model would not fit the memory budget)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for everything random (default 0)")
    parser.add_argument("--timing", action="store_true", help="print the time of every pass and analysis")
    parser.add_argument("--print-ir-after-change", action="store_true", help="print the IR after each pass that changed it")
    parser.add_argument("--verify-each", action="store_true", help="run the IR verifier after every pass")
    parser.add_argument("--statistics", action="store_true", help="print per-pass statistics")
    parser.add_argument(
        "--remarks", nargs="?", const=".*", metavar="REGEX",
        help="print every remark of the passes, or with --remarks=REGEX (the '=' is needed) those of the passes "
        "whose name REGEX matches, like LLVM's -pass-remarks",
    )
    parser.add_argument("--strict", action="store_true", help="fail when a pass misses a structure it targets")
    parser.add_argument(
        "--report", type=Path,
        help="write a report of the run: FILE.html writes the HTML page and FILE.json beside it; any other name "
             "writes JSON, plus the HTML page beside it when the pipeline quantized (per-layer SQNR)",
    )
    parser.add_argument(
        "--compare", action=argparse.BooleanOptionalAction, default=None,
        help="evaluate before and after (size, held-out perplexity, latency); on by default for the default model; "
             "if the comparison fails, the run fails and keeps no output",
    )
    parser.add_argument(
        "--memory-budget", type=_memory_size, metavar="SIZE",
        help="memory a load may use, e.g. 8G or 512M; refused before loading when the estimate exceeds it "
        "(default: the memory available to this process, cgroup limits included)",
    )
    parser.add_argument(
        "--kv-cache", action="store_true",
        help="export a Hugging Face or GGUF causal LM with its KV cache (onnxruntime-genai's inputs and outputs); "
             "an .onnx output then gets genai_config.json and the tokenizer beside it, ready for onnxruntime-genai",
    )
    parser.add_argument("--no-runtime-check", action="store_true", help="do not load the result in its runtime")
    parser.add_argument("--list-passes", action="store_true", help="list every registered pass and exit")
    parser.add_argument("--print-pipeline", action="store_true", help="print the canonical pipeline and exit")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--version", action="version", version=f"optc {__version__}")
    return parser


def _memory_size(text: str) -> int:
    from optc.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def list_passes() -> str:
    from optc.passes import all_passes, all_pipelines
    from optc.passes.infra.options import describe_options
    from optc.passes.infra.registry import plugin_origin

    lines = ["Passes:"]
    for name, cls in all_passes().items():
        origin = plugin_origin(name)
        suffix = f"  [plugin: {origin}]" if origin else ""
        lines.append(f"  {name:<18} {cls.summary()}{suffix}")
        for opt, type_text, default, help_text in describe_options(cls.Options):
            lines.append(f"      {opt}={default:<10} {type_text}{'; ' + help_text if help_text else ''}")
    lines.append("Named pipelines:")
    for name, entry in all_pipelines().items():
        lines.append(f"  {name:<18} {entry.summary}")
        lines.append(f"      = {entry.text}")
        for target, text in sorted(entry.targets.items()):
            lines.append(f"      = {text}   (for --target {target})")
    return "\n".join(lines)


def _validate_calib(spec: str | None) -> None:
    from optc.runtime.calibration_spec import CalibrationSpec

    if spec is not None:
        CalibrationSpec.parse(spec)


def _bare_remarks(argv: list[str]) -> list[str]:
    """`--remarks` alone means every pass (`--remarks=.*`); its value is only ever given with `=`,
    so `optc --remarks model.onnx` keeps model.onnx as the input."""
    end = argv.index("--") if "--" in argv else len(argv)
    return [("--remarks=.*" if i < end and a == "--remarks" else a) for i, a in enumerate(argv)]


def _target_of(args: argparse.Namespace) -> str | None:
    """The backend an invocation writes for: --target, else the output's suffix, else None (not known)."""
    if args.target:
        return args.target
    if args.output is None:
        return None
    from optc.backends import target_for_output

    return target_for_output(Path(args.output))


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(_bare_remarks(argv))
    if args.list_passes:
        print(list_passes())
        return 0
    if args.print_pipeline:
        from optc.passes import parse_pipeline

        if args.passes is None:
            raise UsageError("--print-pipeline needs --passes PIPELINE")
        print(parse_pipeline(args.passes, _target_of(args)).pipeline_text())
        return 0
    if args.output is None:
        raise UsageError("missing -o OUTPUT")
    use_default = args.input is None
    if use_default:
        from optc.frontends.models import default_model_path

        args.input = str(default_model_path())
        # The default model comes with its default data: the built-in text.
        args.calib = args.calib or "builtin"
    compare = use_default if args.compare is None else args.compare
    if args.calib_samples < 1 or args.calib_seqlen < 1:
        raise UsageError("--calib-samples and --calib-seqlen must be at least 1")
    _validate_calib(args.calib)
    # Imported only now: the compiler's imports take a second, a usage error should not.
    from optc.driver import CompileOptions, compile_file

    options = CompileOptions(
        passes=args.passes,
        target=args.target,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        calib_blocks=args.calib_blocks,
        seed=args.seed,
        timing=args.timing,
        print_ir_after_change=args.print_ir_after_change,
        verify_each=args.verify_each,
        statistics=args.statistics,
        report=args.report,
        skip_runtime_check=args.no_runtime_check,
        remarks=args.remarks,
        strict=args.strict,
        compare=compare,
        memory_budget=args.memory_budget,
        kv_cache=args.kv_cache,
    )
    result = compile_file(args.input, args.output, options)
    if not result.wrote:  # a rank other than 0 under torchrun: rank 0 writes and prints
        return 0
    if result.timing and args.timing:
        print(result.timing.report(), file=sys.stderr)
    if result.statistics and args.statistics:
        print(result.statistics.report(), file=sys.stderr)
    print(f"optc: {result.summary()}")
    for check in result.artifact.checks:
        print(f"optc: check: {check}")
    if result.comparison:
        print(result.comparison)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every failure ends in one `optc: error:` line (after a traceback with --debug)."""
    from optc.entry import run_command

    return run_command("optc", run, argv)


if __name__ == "__main__":
    sys.exit(main())
