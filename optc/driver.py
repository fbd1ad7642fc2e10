"""The compile driver: frontend → pass pipeline → backend, shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from optc.backends import Artifact, get_backend, target_for_output
from optc.backends.base import Backend
from optc.errors import (
    BadCalibrationData,
    MissingCalibrationData,
    OptcError,
    PassFailure,
    UsageError,
)
from optc.frontends import load_input
from optc.ir import ExternalTensor, Model, initializer_bytes, model_size_bytes
from optc.ir.spill import SpillFile, attach, detach
from optc.memory import resolve_budget
from optc.outputs import Inputs, RunFiles, Written, check_writes
from optc.passes import (
    AnalysisManager,
    PassContext,
    PassInstrument,
    PassManager,
    PrintIRAfterChange,
    Remark,
    RemarkPrinter,
    StatisticsInstrument,
    TimingInstrument,
    VerifyEach,
    parse_pipeline,
)
from optc.passes.infra.pipeline import pipeline_warnings
from optc.passes.infra.remarks import compile_filter, unique_remarks
from optc.passes.infra.spill import SpillInstrument
from optc.report import QuantReport, report_paths, write_reports
from optc.runtime import distributed
from optc.runtime.calibration import check_calibration

#: The pipeline run when none is given.
DEFAULT_PIPELINE = "cleanup"
#: Rewritten weights go to a spill file when the model's weights exceed this share of the memory budget.
SPILL_SHARE = 0.25


@dataclasses.dataclass
class CompileOptions:
    passes: str | None = None
    target: str | None = None
    calib: str | None = None
    calib_samples: int = 16
    calib_seqlen: int = 256
    #: Calibrate a decoder block by block: "on", "off" or "auto" (when the whole model exceeds the memory budget).
    calib_blocks: str = "auto"
    seed: int = 0
    timing: bool = False
    print_ir_after_change: bool = False
    verify_each: bool = False
    statistics: bool = False
    report: Path | None = None
    skip_runtime_check: bool = False
    #: Evaluate before and after (`--compare`); a failed comparison fails the run (nothing is kept).
    compare: bool = False
    #: Print every remark of the passes whose name this regular expression matches (`--remarks`; ".*": all).
    #: Remarks of passes that matched nothing they were meant for are printed regardless.
    remarks: str | None = None
    #: Fail (exit 1, nothing written) when a pass emits a `missed` remark (`--strict`).
    strict: bool = False
    #: Memory a load may use, in bytes or as text (`8G`); None: what the machine has available.
    memory_budget: int | str | None = None
    #: Export a Hugging Face or GGUF causal LM with its KV cache (`--kv-cache`); an ort output becomes a
    #: generation-ready folder (genai_config.json and the tokenizer beside the model).
    kv_cache: bool = False


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
    #: The before/after table, when `CompileOptions.compare` asked for it.
    comparison: str | None = None
    #: What the passes remarked (`optc.passes.Remark`), without repeats.
    remarks: list[Remark] = dataclasses.field(default_factory=list)
    #: False on the processes other than rank 0 under torchrun: they ran the pipeline, and wrote nothing.
    wrote: bool = True

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
            "remarks": [r.as_dict() for r in self.remarks],
        }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def planned_writes(backend: Backend, output: Path, report: Path | None, *, generation: bool = False) -> list[Written]:
    """Every file a run may write: what the backend declares, the report files and the reproducer.

    `generation`: the model is a KV-cache decoder, for which a backend may write a generation-ready folder.
    """
    flag = str(output)
    writes = [Written(path, flag, what) for path, what in backend.written_files(output, generation=generation)]
    if report is not None:
        for path in report_paths(report):
            what = "the report" if path == report else f"its companion {path}"
            writes.append(Written(path, f"--report {report}", what))
    reproducer = reproducer_path(output)
    writes.append(Written(reproducer, flag, f"its reproducer file {reproducer}"))
    return writes


def run_inputs(source: Path | None, options: CompileOptions) -> Inputs:
    """What a run reads besides the model's own files: the input path and the calibration file."""
    inputs = Inputs.of_path(source) if source is not None else Inputs()
    if options.calib:
        from optc.runtime.calibration_spec import CalibrationSpec

        calib = CalibrationSpec.parse(options.calib)
        if calib.path is not None:
            inputs.add_file(calib.path, f"the calibration data {calib.path}")
    for name, path in pipeline_files(options.passes if options.passes is not None else DEFAULT_PIPELINE):
        what = f"the file {path} that {name} reads"
        if path.is_dir():
            inputs.add_directory(path, what)
        else:
            inputs.add_file(path, what)
    return inputs


def pipeline_files(pipeline_text: str) -> list[tuple[str, Path]]:
    """Files and folders the pipeline's options name (e.g. distill's `teacher=PATH`): inputs of the run too."""
    found: list[tuple[str, Path]] = []

    def visit(passes: list) -> None:
        for p in passes:
            visit(getattr(p, "passes", []))
            options = getattr(p, "options", None)
            if not dataclasses.is_dataclass(options):
                continue
            for field in dataclasses.fields(options):
                value = getattr(options, field.name)
                if isinstance(value, str) and value and Path(value).exists():
                    found.append((f"{p.name}{{{field.name}=...}}", Path(value)))

    visit(parse_pipeline(pipeline_text).passes)
    return found


def model_inputs(model: Model, source: Path | None, options: CompileOptions) -> Inputs:
    """What a loaded model reads: `run_inputs`, the ONNX it was loaded or exported from, its external data."""
    inputs = run_inputs(source, options)
    exported = model.meta.get("optc.source_onnx")
    if exported:
        inputs.add_file(Path(exported), f"the input's ONNX {exported}")
    data_files = {str(v.const_value.path) for v in model.graph.initializers.values()
                  if isinstance(v.const_value, ExternalTensor)}
    for data_file in sorted(data_files):
        inputs.add_file(Path(data_file), f"the input's data {data_file}")
    from optc.frontends.lazy_weights import checkpoint_files

    for weights in checkpoint_files(model):  # weights read lazily from the input's safetensors files
        inputs.add_file(weights, f"the input's weights {weights}")
    return inputs


def compile_file(input_path: str | Path, output: str | Path, options: CompileOptions) -> CompileResult:
    """Compile one model file or directory; raises `OptcError` (or `UsageError`) with one clear line."""
    input_path, output = Path(input_path), Path(output)
    start = time.perf_counter()
    backend = _backend(options, output)
    parse_pipeline(options.passes if options.passes is not None else DEFAULT_PIPELINE, backend.name)
    _remark_filter(options.remarks)
    budget = _memory_budget(options)
    # Before anything is read: no write may touch the input file or anything in an input directory.
    check_writes(planned_writes(backend, output, options.report, generation=options.kv_cache),
                 run_inputs(input_path, options))
    world = distributed.init_from_env()
    if world.distributed and not world.primary:
        distributed.barrier()  # rank 0 loads first: one export fills the cache the others then read
    model = load_input(input_path, memory_budget=budget, kv_cache=options.kv_cache)
    if world.distributed and world.primary:
        distributed.barrier()
    return compile_model(model, output, options, source=input_path, start=start)


def _backend(options: CompileOptions, output: Path) -> Backend:
    """The target's backend; an explicit target must match the output's suffix."""
    if options.target is None:
        return get_backend(target_for_output(output))
    backend = get_backend(options.target)
    backend.check_output_suffix(output)
    return backend


def _memory_budget(options: CompileOptions) -> int | None:
    """The budget in bytes (an ill-typed one is a usage error); None when the machine's memory is unknown."""
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
    """Run the pipeline on an IR model and lower it; `source` is recorded in reproducers.

    Every file the run may write is checked against what it reads first; if
    anything fails afterwards (an error or a signal, as `KeyboardInterrupt`),
    the files the run had already moved into place are removed again.
    """
    output = Path(output)
    start = time.perf_counter() if start is None else start
    backend = _backend(options, output)
    pipeline_text = options.passes if options.passes is not None else DEFAULT_PIPELINE
    pipeline = parse_pipeline(pipeline_text, backend.name)
    remark_filter = _remark_filter(options.remarks)
    primary = distributed.init_from_env().primary
    for message in pipeline_warnings(pipeline) if primary else []:
        print(f"optc: warning: {message}", file=sys.stderr)
    files = RunFiles(planned_writes(backend, output, options.report, generation=is_cache_decoder(model)))
    files.check(model_inputs(model, source, options))
    check_calibration(model, options.calib)  # bad arrays: one line now, not a pass failure later
    quant_report = None
    spill = _spill_file(model, output, options, primary)
    if spill is not None:
        attach(model, spill)
    try:
        nodes_before = model.graph.num_nodes()
        before_path = source_onnx(model, source)
        input_bytes = model_size_bytes(before_path) if before_path is not None else initializer_bytes(model.graph)
        quant_report = QuantReport.start(model, options.report, before_path, output, source) if primary else None
        return _run(model, output, options, backend, quant_report, pipeline=pipeline, pipeline_text=pipeline_text,
                    remark_filter=remark_filter, source=source, before_path=before_path,
                    nodes_before=nodes_before, input_bytes=input_bytes, start=start, spill=spill)
    except BaseException:
        if primary:  # the other ranks wrote nothing
            files.discard(keep=[reproducer_path(output)])  # a failed run leaves no output (a reproducer stays)
        raise
    finally:
        if quant_report is not None:
            quant_report.close()
        if spill is not None:
            detach(model)
            spill.close()


def _spill_file(model: Model, output: Path, options: CompileOptions, primary: bool) -> SpillFile | None:
    """A spill file beside the output (in $TMPDIR on ranks other than 0) when the model's weights exceed
    `SPILL_SHARE` of the memory budget, or when `--calib-blocks on` asks for the streaming path (then the
    weights a pass rewrites, such as smoothquant's scaled copies of every weight, go to the file too
    instead of doubling the float weights in RAM); None otherwise (rewritten weights then stay in memory)."""
    budget = _memory_budget(options)
    streaming = options.calib_blocks == "on"
    if not streaming and (budget is None or initializer_bytes(model.graph) <= SPILL_SHARE * budget):
        return None
    import tempfile

    folder = (output.parent if str(output.parent) else Path(".")) if primary else Path(tempfile.gettempdir())
    return SpillFile(folder, output.name)


def _run(
    model: Model,
    output: Path,
    options: CompileOptions,
    backend: Backend,
    quant_report: QuantReport | None,
    *,
    pipeline: PassManager,
    pipeline_text: str,
    remark_filter: re.Pattern[str] | None,
    source: Path | None,
    before_path: Path | None,
    nodes_before: int,
    input_bytes: int,
    start: float,
    spill: SpillFile | None = None,
) -> CompileResult:
    """The pipeline, the lowering, the report and the comparison (`compile_model` cleans up after a failure).

    Under torchrun every rank runs the pipeline (the calibration analyses share the samples out
    and combine their statistics); only rank 0 prints remarks, lowers, writes and reports.
    """
    primary = distributed.current().primary
    instruments: list[PassInstrument] = [RemarkPrinter(remark_filter)] if primary else []
    timing = TimingInstrument() if options.timing or options.report else None
    stats = StatisticsInstrument() if options.statistics or options.report else None
    if options.verify_each:
        instruments.append(VerifyEach())
    if options.print_ir_after_change:
        instruments.append(PrintIRAfterChange())
    instruments += [i for i in (timing, stats) if i is not None]
    if spill is not None:
        instruments.append(SpillInstrument(spill))
    config = {
        "calibration.spec": options.calib,
        "calibration.samples": options.calib_samples,
        "calibration.seqlen": options.calib_seqlen,
        "calibration.blocks": options.calib_blocks,
        "calibration.memory_budget": _memory_budget(options),
        "backend.skip_runtime_check": options.skip_runtime_check,
        "frontend.load_model": load_input,  # for passes that read a second model (distill teacher=PATH)
    }
    context = PassContext(config=config, instruments=instruments, seed=options.seed, input_path=source,
                          target=backend.name, strict=options.strict)
    am = AnalysisManager(context)
    full = PassManager([*pipeline.passes, *parse_pipeline(backend.legalize).passes])
    try:
        result = full(model, am)
    except PassFailure as failure:
        if isinstance(failure.cause, BadCalibrationData):
            raise failure.cause from failure  # the data, not a pass, is at fault; nothing to reproduce
        if isinstance(failure.cause, MissingCalibrationData) or not primary:
            raise  # the input lacks data, or rank 0 writes the reproducer; nothing to reproduce here
        reproduce_from = source or persistent_source(model, before_path)
        failure.reproducer = write_reproducer(reproduce_from, output, pipeline_text, failure)  # type: ignore[attr-defined]
        raise
    if not primary:
        return CompileResult(
            Artifact(output, backend.name, 0), pipeline.pipeline_text(), nodes_before, result.model.graph.num_nodes(),
            input_bytes, time.perf_counter() - start, timing, stats, before_path,
            remarks=unique_remarks(context.remarks), wrote=False,
        )
    if quant_report is not None:
        quant_report.after_pipeline(result.model, output)
    try:
        artifact = backend.lower(result.model, output, context)
    except OSError as exc:
        raise OptcError(f"{output}: cannot write ({_reason(exc)}); nothing was written") from exc
    compiled = CompileResult(
        artifact, pipeline.pipeline_text(), nodes_before, result.model.graph.num_nodes(), input_bytes,
        time.perf_counter() - start, timing, stats, before_path, remarks=unique_remarks(context.remarks),
    )
    if options.report:
        data = compiled.as_dict()
        quantized = quant_report is not None and quant_report.quantized
        if quantized:
            # A per-layer error section (optc/report.py).
            data["quantization"] = quant_report.measure(artifact.path, context)  # type: ignore[union-attr]
        try:
            if quantized or options.report.suffix.lower() in (".html", ".htm"):
                write_reports(options.report, data)  # the HTML page and the JSON beside it
            else:
                write_report(options.report, data)
        except OSError as exc:
            raise OptcError(f"--report {options.report}: cannot write ({_reason(exc)}); nothing was written") from exc
    if options.compare:
        compiled.comparison = compare_table(compiled)
    return compiled


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def is_cache_decoder(model: Model) -> bool:
    """True for a decoder with KV-cache inputs (`optc.runtime.decoder`)."""
    from optc.runtime.decoder import has_cache

    return has_cache(v.name for v in model.graph.inputs)


def persistent_source(model: Model, before_path: Path | None) -> Path | None:
    """`before_path` when it outlives the run (not an export in a temporary folder), for reproducers."""
    return None if model.meta.get("optc.export_dir") is not None else before_path


def reproducer_path(output: Path) -> Path:
    return output.with_name(output.name + ".reproducer.txt")


def _remark_filter(pattern: str | None) -> re.Pattern[str] | None:
    """The compiled `remarks` option (a usage error when it is not a regular expression)."""
    if pattern is None:
        return None
    try:
        return compile_filter(pattern)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


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
    path = reproducer_path(output)
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)  # never written through a link into someone else's file
    except OSError:
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def compare_table(result: CompileResult, *, max_tokens: int = 4096, ctx: int = 256) -> str:
    """Before/after table (size on disk, held-out perplexity, latency of one window) for a causal LM."""
    from optc.evaluate import TOKENIZER_HINT, evaluate, load_tokenizer

    if result.before_path is None:
        raise OptcError("--compare needs the model before the pipeline as a file (an .onnx, HF directory or .gguf input)")
    source = result.artifact.path if result.artifact.path.suffix == ".onnx" else result.before_path
    try:
        tokenizer = load_tokenizer(source)
    except OptcError as exc:
        # load_tokenizer speaks to optc-eval's users (--tokenizer SRC); optc has no such flag.
        cause = str(exc).replace(f"; {TOKENIZER_HINT}", "").removeprefix("--tokenizer ")
        raise OptcError(
            f"--compare: {cause}; it measures perplexity with the model's own tokenizer (inputs from a Hugging Face "
            "directory or a .gguf file carry one); measure with another tokenizer by running "
            "optc-eval OUTPUT --tokenizer SRC instead"
        ) from exc
    try:
        before = evaluate(result.before_path, None, ctx, max_tokens, tokenizer)
        after = evaluate(result.artifact.path, None, ctx, max_tokens, tokenizer)
    except OptcError as exc:
        raise OptcError(f"--compare: {exc}") from exc
    rows = [
        ("size on disk", f"{before.size_bytes / 1e6:.1f} MB", f"{after.size_bytes / 1e6:.1f} MB", after.size_bytes / before.size_bytes),
        ("perplexity", f"{before.ppl:.3f}", f"{after.ppl:.3f}", after.ppl / before.ppl),
        (f"latency / {ctx} tokens", f"{before.median_latency_s * 1e3:.0f} ms", f"{after.median_latency_s * 1e3:.0f} ms",
         after.median_latency_s / before.median_latency_s),
    ]
    if is_generation_output(result.artifact.path):
        from optc.runtime.text import builtin_text

        prompt = [int(t) for t in tokenizer(builtin_text("eval"), add_special_tokens=False)["input_ids"][:DECODE_PROMPT]]
        speeds = [decode_speed(path, prompt, DECODE_TOKENS) for path in (result.before_path, result.artifact.path)]
        rows.append((f"decode tokens/s ({DECODE_TOKENS} new)", f"{speeds[0]:.1f}", f"{speeds[1]:.1f}", speeds[1] / speeds[0]))
    width = max(22, *(len(row[0]) for row in rows))
    lines = [
        f"held-out text: {after.tokens} predicted tokens in {after.windows} windows of {ctx} (pydoc_data.topics eval split)",
        f"| {'':<{width}} | {'before':>12} | {'after':>12} | {'after/before':>12} |",
        f"|{'-' * (width + 2)}|{'-' * 14}|{'-' * 14}|{'-' * 14}|",
    ]
    lines += [f"| {name:<{width}} | {b:>12} | {a:>12} | {ratio:>11.2f}x |" for name, b, a, ratio in rows]
    return "\n".join(lines)


#: The default job's decode row: new tokens after a prompt of this many tokens of the eval text.
DECODE_PROMPT, DECODE_TOKENS = 64, 32


def is_generation_output(path: Path) -> bool:
    """An ONNX output with the generation-ready folder beside it (`--kv-cache`)."""
    return path.suffix == ".onnx" and path.with_name("genai_config.json").is_file()


def decode_speed(onnx_file: Path, prompt: list[int], new_tokens: int) -> float:
    """Greedy decode tokens/s of a KV-cache ONNX file through onnxruntime-genai (a generation folder viewed
    around it when it has none, e.g. the cached export before the pipeline)."""
    import tempfile

    from optc.backends.ort.genai import generation_folder
    from optc.evaluate import default_threads
    from optc.generate import generate
    from optc.ir import load_model

    with tempfile.TemporaryDirectory(prefix="optc-decode-") as folder:
        target = onnx_file
        if not is_generation_output(onnx_file):
            target = generation_folder(onnx_file, load_model(onnx_file), Path(folder))
        return generate(target, prompt, new_tokens, threads=default_threads()).decode_tokens_per_s
