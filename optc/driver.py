"""The compile driver: frontend → pass pipeline → backend, shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from optc.backends import Artifact, get_backend, target_for_output
from optc.errors import OptcError, PassFailure
from optc.frontends import load_input
from optc.ir import model_size_bytes
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


def check_paths(input_path: Path, output: Path) -> None:
    """Refuse outputs that would overwrite the input or its external data."""
    out = output.resolve()
    if out == input_path.resolve():
        raise OptcError(f"{output}: output would overwrite the input; choose another path")
    data = out.with_name(out.name + ".data")
    if input_path.is_file() and input_path.suffix == ".onnx":
        try:
            from optc.ir.io import model_files

            if any(f.resolve() == data for f in model_files(input_path)):
                raise OptcError(f"{output}: its external data file would overwrite the input's data")
        except OptcError:
            raise
        except Exception:  # noqa: BLE001 - an unreadable input is reported by the frontend
            pass
    if not out.parent.is_dir():
        raise OptcError(f"{output}: output folder {out.parent} does not exist")


def compile_file(input_path: str | Path, output: str | Path, options: CompileOptions) -> CompileResult:
    """Compile one model file; raises `OptcError` (or `UsageError`) with one clear line."""
    input_path, output = Path(input_path), Path(output)
    start = time.perf_counter()
    target = options.target or target_for_output(output)
    backend = get_backend(target)
    pipeline_text = options.passes if options.passes is not None else DEFAULT_PIPELINE
    pipeline = parse_pipeline(pipeline_text)
    check_paths(input_path, output)

    model = load_input(input_path)
    nodes_before = model.graph.num_nodes()
    input_bytes = model_size_bytes(input_path) if input_path.suffix == ".onnx" else 0

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
    context = PassContext(config=config, instruments=instruments, seed=options.seed, input_path=input_path, target=target)
    am = AnalysisManager(context)
    full = PassManager([*pipeline.passes, *parse_pipeline(backend.legalize).passes])
    try:
        result = full(model, am)
    except PassFailure as failure:
        failure.reproducer = write_reproducer(input_path, output, pipeline_text, failure)  # type: ignore[attr-defined]
        raise
    artifact = backend.lower(result.model, output, context)
    compiled = CompileResult(
        artifact, pipeline.pipeline_text(), nodes_before, result.model.graph.num_nodes(), input_bytes,
        time.perf_counter() - start, timing, stats,
    )
    if options.report:
        write_report(options.report, compiled.as_dict())
    return compiled


def write_report(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON report atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_reproducer(input_path: Path, output: Path, pipeline_text: str, failure: PassFailure) -> Path | None:
    """Write `<output>.reproducer.txt`: the failing pass, the error, and the command that reproduces it."""
    path = output.with_name(output.name + ".reproducer.txt")
    command = shlex.join(
        ["optc", str(input_path.resolve()), "--passes", pipeline_text, "-o", str(output.resolve()), "--verify-each", "--debug"]
    )
    text = (
        f"# optc reproducer\n# failed pass: {failure.pass_name}\n# error: {failure.cause!r}\n"
        f"# passes before it: {', '.join(failure.before) or '(none)'}\n"
        f"input: {input_path.resolve()}\npipeline: {pipeline_text}\n{command}\n"
    )
    try:
        path.write_text(text)
    except OSError:
        return None
    return path
