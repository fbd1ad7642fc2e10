"""The compile driver: frontend → pass pipeline → backend, shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from optc.backends import Artifact, get_backend, target_for_output
from optc.errors import MissingCalibrationData, OptcError, PassFailure
from optc.frontends import load_input
from optc.ir import ExternalTensor, Model, initializer_bytes, model_size_bytes
from optc.ir.io import remove_model
from optc.passes import (
    AnalysisManager,
    PassContext,
    PassInstrument,
    PassManager,
    PrintIRAfterChange,
    StatisticsInstrument,
    TimingInstrument,
    VerifyEach,
    parse_pipeline,
)
from optc.passes.infra.pipeline import pipeline_warnings
from optc.report import QuantReport

#: The pipeline run when none is given.
DEFAULT_PIPELINE = "cleanup"


@dataclasses.dataclass
class CompileOptions:
    passes: str | None = None
    target: str | None = None
    calib: str | None = None
    calib_samples: int = 16
    calib_seqlen: int = 256
    seed: int = 0
    timing: bool = False
    print_ir_after_change: bool = False
    verify_each: bool = False
    statistics: bool = False
    report: Path | None = None
    skip_runtime_check: bool = False
    #: Memory a load may use, in bytes or as text (`8G`); None: what the machine has available.
    memory_budget: int | str | None = None


@dataclasses.dataclass
class CompileResult:
    artifact: Artifact
    pipeline: str
    nodes_before: int
    nodes_after: int
    input_bytes: int
    seconds: float
    timing: TimingInstrument | None
    statistics: StatisticsInstrument | None
    #: The ONNX file of the model before the pipeline, when there is one (for before/after tables).
    before_path: Path | None = None

    def summary(self) -> str:
        return (
            f"wrote {self.artifact.path} [{self.artifact.target}]: nodes {self.nodes_before} -> {self.nodes_after}, "
            f"{_mb(self.input_bytes)} -> {_mb(self.artifact.size_bytes)} in {self.seconds:.2f}s"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.artifact.path),
            "target": self.artifact.target,
            "pipeline": self.pipeline,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "input_bytes": self.input_bytes,
            "output_bytes": self.artifact.size_bytes,
            "seconds": round(self.seconds, 4),
            "checks": self.artifact.checks,
            "timing": self.timing.as_dict() if self.timing else None,
            "statistics": self.statistics.rows if self.statistics else None,
        }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def check_paths(input_path: Path | None, output: Path, report: Path | None = None) -> None:
    """Refuse, before any work, an output or report that would overwrite the input or cannot be written."""
    source = input_path.resolve() if input_path is not None else None
    out = output.resolve()
    if out == source:
        raise OptcError(f"{output}: output would overwrite the input; choose another path")
    if out.is_dir():
        raise OptcError(f"{output}: is a directory; give the output file's path")
    _check_folder(str(output), out.parent)
    if report is not None:
        rep = report.resolve()
        if rep == source:
            raise OptcError(f"--report {report}: would overwrite the input; choose another path")
        if rep in (out, out.with_name(out.name + ".data")):
            raise OptcError(f"--report {report}: would overwrite the output; choose another path")
        if rep.is_dir():
            raise OptcError(f"--report {report}: is a directory; give the report file's path")
        _check_folder(f"--report {report}", rep.parent)


def _check_folder(label: str, folder: Path) -> None:
    if not folder.is_dir():
        raise OptcError(f"{label}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptcError(f"{label}: output folder {folder} is not writable")


def check_data_clash(model: Model, output: Path, report: Path | None) -> None:
    """Refuse an output, its external data file or a report that would overwrite the input's weights."""
    out = output.resolve()
    written = {out: str(output), out.with_name(out.name + ".data"): f"{output}: its external data file"}
    if report is not None:
        written[report.resolve()] = f"--report {report}"
    for value in model.graph.initializers.values():
        data = value.const_value
        if isinstance(data, ExternalTensor) and Path(data.path).resolve() in written:
            raise OptcError(f"{written[Path(data.path).resolve()]} would overwrite the input's data {data.path}")


def compile_file(input_path: str | Path, output: str | Path, options: CompileOptions) -> CompileResult:
    """Compile one model file or directory; raises `OptcError` (or `UsageError`) with one clear line."""
    input_path, output = Path(input_path), Path(output)
    start = time.perf_counter()
    target = options.target or target_for_output(output)
    get_backend(target)
    parse_pipeline(options.passes if options.passes is not None else DEFAULT_PIPELINE)
    budget = _memory_budget(options)
    check_paths(input_path, output, options.report)
    model = load_input(input_path, memory_budget=budget)
    return compile_model(model, output, options, source=input_path, start=start)


def _memory_budget(options: CompileOptions) -> int | None:
    """The budget in bytes (an ill-typed one is a usage error); None when the machine's memory is unknown."""
    from optc.errors import UsageError
    from optc.memory import resolve_budget

    try:
        return resolve_budget(options.memory_budget)
    except ValueError as exc:
        raise UsageError(f"memory budget: {exc}") from exc


def compile_model(
    model: Model,
    output: str | Path,
    options: CompileOptions,
    *,
    source: Path | None = None,
    start: float | None = None,
) -> CompileResult:
    """Run the pipeline on an IR model and lower it; `source` is recorded in reproducers."""
    output = Path(output)
    start = time.perf_counter() if start is None else start
    target = options.target or target_for_output(output)
    backend = get_backend(target)
    pipeline_text = options.passes if options.passes is not None else DEFAULT_PIPELINE
    pipeline = parse_pipeline(pipeline_text)
    for message in pipeline_warnings(pipeline):
        print(f"optc: warning: {message}", file=sys.stderr)
    if source is None:
        check_paths(None, output, options.report)
    check_data_clash(model, output, options.report)
    nodes_before = model.graph.num_nodes()
    before_path = source_onnx(model, source)
    input_bytes = model_size_bytes(before_path) if before_path is not None else initializer_bytes(model.graph)
    quant_report = QuantReport.start(model, options.report, before_path, output, source)

    instruments: list[PassInstrument] = []
    timing = TimingInstrument() if options.timing or options.report else None
    stats = StatisticsInstrument() if options.statistics or options.report else None
    if options.verify_each:
        instruments.append(VerifyEach())
    if options.print_ir_after_change:
        instruments.append(PrintIRAfterChange())
    instruments += [i for i in (timing, stats) if i is not None]
    config = {
        "calibration.spec": options.calib,
        "calibration.samples": options.calib_samples,
        "calibration.seqlen": options.calib_seqlen,
        "backend.skip_runtime_check": options.skip_runtime_check,
    }
    context = PassContext(config=config, instruments=instruments, seed=options.seed, input_path=source, target=target)
    am = AnalysisManager(context)
    full = PassManager([*pipeline.passes, *parse_pipeline(backend.legalize).passes])
    try:
        result = full(model, am)
    except PassFailure as failure:
        if isinstance(failure.cause, MissingCalibrationData):
            raise  # the input lacks data; nothing to reproduce
        failure.reproducer = write_reproducer(source or before_path, output, pipeline_text, failure)  # type: ignore[attr-defined]
        raise
    if quant_report is not None:
        quant_report.after_pipeline(result.model, output)
    artifact = backend.lower(result.model, output, context)
    compiled = CompileResult(
        artifact, pipeline.pipeline_text(), nodes_before, result.model.graph.num_nodes(), input_bytes,
        time.perf_counter() - start, timing, stats, before_path,
    )
    if options.report:
        try:
            if quant_report is not None and quant_report.quantized:
                # Quantized: a per-layer error section, written as JSON and as HTML (optc/report.py).
                quant_report.write({**compiled.as_dict(), "quantization": quant_report.measure(artifact.path, context)})
            else:
                write_report(options.report, compiled.as_dict())
        except OSError as exc:
            remove_model(artifact.path)  # a failed run leaves no output
            raise OptcError(f"--report {options.report}: cannot write ({exc.strerror or exc}); nothing was written") from exc
        except OptcError:
            remove_model(artifact.path)
            raise
        finally:
            if quant_report is not None:
                quant_report.close()
    return compiled


def source_onnx(model: Model, source: Path | None) -> Path | None:
    """The ONNX file the model was loaded or exported from, if any (for sizes and before/after checks)."""
    exported = model.meta.get("optc.source_onnx")
    if exported:
        return Path(exported)
    if source is not None and source.suffix.lower() == ".onnx" and source.is_file():
        return source
    return None


def write_report(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON report atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_reproducer(input_path: Path | None, output: Path, pipeline_text: str, failure: PassFailure) -> Path | None:
    """Write `<output>.reproducer.txt`: the failing pass, the error, and the command that reproduces it."""
    path = output.with_name(output.name + ".reproducer.txt")
    lines = [
        "# optc reproducer",
        f"# failed pass: {failure.pass_name}",
        f"# error: {failure.cause!r}",
        f"# passes before it: {', '.join(failure.before) or '(none)'}",
    ]
    if input_path is None:
        lines += ["input: (an in-memory model; save it with optc.ir.save_model to reproduce)", f"pipeline: {pipeline_text}"]
    else:
        command = ["optc", str(input_path.resolve()), "--passes", pipeline_text, "-o", str(output.resolve())]
        lines += [f"input: {input_path.resolve()}", f"pipeline: {pipeline_text}", shlex.join([*command, "--verify-each", "--debug"])]
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError:
        return None
    return path


def compare_table(result: CompileResult, *, max_tokens: int = 4096, ctx: int = 256) -> str:
    """Before/after table (size on disk, held-out perplexity, latency of one window) for a causal LM."""
    from optc.evaluate import evaluate, load_tokenizer

    if result.before_path is None:
        raise OptcError("--compare needs the model before the pipeline as a file (an .onnx, HF directory or .gguf input)")
    tokenizer = load_tokenizer(result.artifact.path if result.artifact.path.suffix == ".onnx" else result.before_path)
    before = evaluate(result.before_path, None, ctx, max_tokens, tokenizer)
    after = evaluate(result.artifact.path, None, ctx, max_tokens, tokenizer)
    rows = [
        ("size on disk", f"{before.size_bytes / 1e6:.1f} MB", f"{after.size_bytes / 1e6:.1f} MB", after.size_bytes / before.size_bytes),
        ("perplexity", f"{before.ppl:.3f}", f"{after.ppl:.3f}", after.ppl / before.ppl),
        (f"latency / {ctx} tokens", f"{before.median_latency_s * 1e3:.0f} ms", f"{after.median_latency_s * 1e3:.0f} ms",
         after.median_latency_s / before.median_latency_s),
    ]
    lines = [
        f"held-out text: {after.tokens} predicted tokens in {after.windows} windows of {ctx} (pydoc_data.topics eval split)",
        f"| {'':<22} | {'before':>12} | {'after':>12} | {'after/before':>12} |",
        f"|{'-' * 24}|{'-' * 14}|{'-' * 14}|{'-' * 14}|",
    ]
    lines += [f"| {name:<22} | {b:>12} | {a:>12} | {ratio:>11.2f}x |" for name, b, a, ratio in rows]
    return "\n".join(lines)

