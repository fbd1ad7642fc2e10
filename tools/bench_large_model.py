#!/usr/bin/env python3
"""Benchmark: a > 2 GiB ONNX model with external data through `optc --passes=dce`.

The model is made at run time from random float32 weights and written in a
streaming way: every weight is generated in small chunks and appended to the
external data file, and the protobuf only holds `external_data` references, so
this script never holds more than one chunk of weights in memory. The graph is
a stack of `MatMul -> Add` layers plus dead branches (`MatMul -> Relu` whose
result nothing reads) and an initializer no node uses, so `dce` has work to do.

`optc MODEL --passes=dce -o OUT` then runs as a child process. Its peak RSS is
measured exactly with `os.wait4` (the kernel's `ru_maxrss` of that child); on
Linux `/proc/PID/status` is also sampled to split the peak into anonymous
memory and file-backed (memory-mapped) pages. The output is checked (external
data, loads with `optc.ir.load_model`, the expected tensor names, the bytes of a
few weights), and one markdown table is printed. The exit status is non-zero
when peak RSS is not below the model's size on disk (`--max-ratio` tightens
this), or when the output is wrong. A second run with `--no-runtime-check`
shows what the onnxruntime check itself costs.

Why the bound holds: optc maps external weights and never reads them (save
copies them file to file with `copy_file_range`), and the onnxruntime check
opens the session with prepacking disabled, so onnxruntime maps the weights
too. With prepacking on, MatMul copies every weight and peak RSS exceeds the
model size; the dead weights are kept small so that this run fails the bound.

    python tools/bench_large_model.py                  # ~2.2 GiB, temp folder removed after
    python tools/bench_large_model.py --size-gib 0.2   # a quick run
    python tools/bench_large_model.py --dir /big --keep
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import markdown_table, optc_command  # noqa: E402 - the benchmarks' shared helpers (tools/_bench.py)

#: ONNX protobufs cannot exceed this; a model above it needs external data.
PROTOBUF_LIMIT = 2**31
#: Offsets of weights in the data file are aligned to this (what exporters and optc do).
ALIGNMENT = 1 << 16
#: Elements generated per chunk while writing weights (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22
OPSET = 21
IR_VERSION = 10


@dataclasses.dataclass
class BuiltModel:
    """What `build_model` wrote, for the checks after the run."""

    path: Path
    data_path: Path
    nodes: int
    weight_bytes: int
    all_tensors: list[str]
    live_tensors: list[str]
    dead_tensors: list[str]


@dataclasses.dataclass
class RunResult:
    """One child run of optc: exit status, output, and what it cost."""

    command: list[str]
    returncode: int
    seconds: float
    peak_rss: int
    peak_anon: int | None
    peak_file: int | None
    stdout: str
    stderr: str


def _align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _write_random(data_file, rng: np.random.Generator, elements: int, scale: float) -> None:
    """Append `elements` random float32 values, generated CHUNK_ELEMENTS at a time."""
    written = 0
    while written < elements:
        n = min(CHUNK_ELEMENTS, elements - written)
        chunk = rng.standard_normal(n, dtype=np.float32)
        chunk *= np.float32(scale)
        chunk.tofile(data_file)
        written += n


def build_model(folder: Path, size_bytes: int, hidden: int, seed: int) -> BuiltModel:
    """Write `model.onnx` and `model.onnx.data` with at least `size_bytes` of float32 weights.

    Layer i: `h = Add(MatMul(h, W_i), b_i)`. Every 8th layer also has a dead
    branch `Relu(MatMul(h, D_i))` whose output nothing reads; `unused` is an
    initializer no node reads. Dead weights are narrow (hidden x hidden/8), so
    the output is nearly as large as the input and a run that copies every
    weight once cannot stay under the model size. The protobuf holds only
    external references.
    """
    path = folder / "model.onnx"
    data_name = path.name + ".data"
    data_path = folder / data_name
    rng = np.random.default_rng(seed)
    narrow = max(1, hidden // 8)
    layer_bytes = (hidden * hidden + hidden) * 4 + hidden * narrow * 4 / 8
    live = max(2, math.ceil(size_bytes / layer_bytes))

    initializers: list[TensorProto] = []
    live_names: list[str] = []
    dead_names: list[str] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    scale = 1.0 / math.sqrt(hidden)

    with open(data_path, "wb") as data_file:

        def add_weight(name: str, shape: list[int]) -> None:
            nonlocal offset
            elements = math.prod(shape)
            offset = _align(offset)
            data_file.seek(offset)
            _write_random(data_file, rng, elements, scale)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", offset),
                ("length", elements * 4),
            ):
                tensor.external_data.add(key=key, value=str(value))
            initializers.append(tensor)
            offset += elements * 4

        h = "x"
        for i in range(live):
            w, b = f"layer{i}.weight", f"layer{i}.bias"
            add_weight(w, [hidden, hidden])
            add_weight(b, [hidden])
            live_names += [w, b]
            nodes.append(
                helper.make_node("MatMul", [h, w], [f"layer{i}.mm"], name=f"layer{i}.matmul")
            )
            nodes.append(
                helper.make_node(
                    "Add", [f"layer{i}.mm", b], [f"layer{i}.out"], name=f"layer{i}.add"
                )
            )
            if i % 8 == 0:
                d = f"dead{i}.weight"
                add_weight(d, [hidden, narrow])
                dead_names.append(d)
                nodes.append(
                    helper.make_node(
                        "MatMul", [f"layer{i}.out", d], [f"dead{i}.mm"], name=f"dead{i}.matmul"
                    )
                )
                nodes.append(
                    helper.make_node(
                        "Relu", [f"dead{i}.mm"], [f"dead{i}.relu"], name=f"dead{i}.relu"
                    )
                )
            h = f"layer{i}.out"
        add_weight("unused", [narrow, hidden])
        dead_names.append("unused")
        data_file.truncate(offset)

    graph = helper.make_graph(
        nodes,
        "bench_large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", hidden])],
        initializer=initializers,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.save(proto, path)
    onnx.checker.check_model(str(path))  # checks the data file exists; reads no weights
    return BuiltModel(
        path,
        data_path,
        len(nodes),
        offset,
        [t.name for t in initializers],
        live_names,
        dead_names,
    )


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    """Selected `kB` fields of /proc/PID/status (empty once the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def run_optc(args: list[str], sample_interval: float = 0.02) -> RunResult:
    """Run optc as a child; exact peak RSS from `os.wait4`, anon/file split from sampling."""
    command = [*optc_command(), *args]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err)
        peaks = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        sampled = threading.Event()
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                values = _status_kib(child.pid, tuple(peaks))
                if values:
                    sampled.set()
                    anon = values.get("RssAnon", 0)
                    file = values.get("RssFile", 0) + values.get("RssShmem", 0)
                    peaks["RssAnon"] = max(peaks["RssAnon"], anon)
                    peaks["RssFile"] = max(peaks["RssFile"], file)
                done.wait(sample_interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4 reaps the child itself, so Popen must not: its returncode is set from here.
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    on_proc = sampled.is_set()
    return RunResult(
        command,
        child.returncode,
        seconds,
        peak_rss=usage.ru_maxrss * 1024,  # Linux reports KiB
        peak_anon=peaks["RssAnon"] * 1024 if on_proc else None,
        peak_file=peaks["RssFile"] * 1024 if on_proc else None,
        stdout=stdout,
        stderr=stderr,
    )


def _same_bytes(a, b, chunk: int = 1 << 24) -> bool:
    """Compare two memory-mapped arrays chunk by chunk (never whole copies)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.shape != fb.shape or fa.dtype != fb.dtype:
        return False
    step = max(1, chunk // fa.itemsize)
    return all(np.array_equal(fa[i : i + step], fb[i : i + step]) for i in range(0, fa.size, step))


def check_output(built: BuiltModel, output: Path) -> tuple[list[str], int]:
    """Problems with optc's output (empty when it is right) and its node count."""
    from optc.ir import ExternalTensor, load_model

    problems: list[str] = []
    proto = onnx.load(str(output), load_external_data=False)
    nodes = len(proto.graph.node)
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if not external:
        problems.append("output has no external data")
    if output.stat().st_size >= PROTOBUF_LIMIT:
        problems.append("output protobuf is over 2 GiB")
    model = load_model(output)
    names = set(model.graph.initializers)
    if names != set(built.live_tensors):
        missing = sorted(set(built.live_tensors) - names)[:3]
        extra = sorted(names - set(built.live_tensors))[:3]
        problems.append(f"tensor names differ (missing {missing}, unexpected {extra})")
    if any(
        not isinstance(v.const_value, ExternalTensor)
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.nbytes >= 1 << 20
    ):
        problems.append("a large weight is not external in the output")
    source = load_model(built.path)
    weights = [n for n in built.live_tensors if n.endswith(".weight")]
    for name in {weights[0], weights[len(weights) // 2], weights[-1], built.live_tensors[-1]}:
        if name not in names:
            continue
        a, b = (
            source.graph.initializers[name].const_value,
            model.graph.initializers[name].const_value,
        )
        if not _same_bytes(a.numpy(), b.numpy()):
            problems.append(f"bytes of {name!r} changed")
        for tensor in (a, b):
            if isinstance(tensor, ExternalTensor):
                tensor.release()
    expected_nodes = built.nodes - 2 * (len(built.dead_tensors) - 1)
    if nodes != expected_nodes:
        problems.append(f"expected {expected_nodes} nodes after dce, found {nodes}")
    return problems, nodes


def _size(n: float) -> str:
    return f"{n / 2**30:.3f} GiB ({n / 1e6:,.0f} MB)"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-gib",
        type=float,
        default=2.2,
        help="float32 weight bytes to make, in GiB (default 2.2)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=4096,
        help="layer width; one weight is hidden² floats (default 4096)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (default 0)"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="make the temporary folder under DIR (default: the system temp folder)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (model and output)"
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=1.0,
        help="fail when peak RSS / model size reaches this (default 1.0: below the model size)",
    )
    parser.add_argument(
        "--no-comparison", action="store_true", help="skip the second run with --no-runtime-check"
    )
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep the table after the progress lines on stderr
    if args.hidden < 1 or args.size_gib <= 0:
        parser.error("--hidden and --size-gib must be positive")

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    from optc.ir import model_size_bytes

    folder = Path(tempfile.mkdtemp(prefix="optc-bench-large-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        built = build_model(folder, int(args.size_gib * 2**30), args.hidden, args.seed)
        build_seconds = time.perf_counter() - t0
        model_bytes = model_size_bytes(built.path)
        print(
            f"built {built.path} ({_size(model_bytes)}, {built.nodes} nodes) in {build_seconds:.1f}s",
            file=sys.stderr,
        )

        runs: list[tuple[str, RunResult, Path]] = []
        variants = [("with onnxruntime check", [])]
        if not args.no_comparison:
            variants.append(("--no-runtime-check", ["--no-runtime-check"]))
        for index, (label, extra) in enumerate(variants):
            output = folder / f"out{index}.onnx"
            # Flush the gigabytes just written so that writeback of earlier files
            # does not land in this run's wall time (it does not affect RSS).
            os.sync()
            result = run_optc([str(built.path), "--passes=dce", "-o", str(output), *extra])
            print(
                f"{label}: exit {result.returncode} in {result.seconds:.1f}s, peak RSS {_mib(result.peak_rss)}",
                file=sys.stderr,
            )
            if result.returncode != 0:
                sys.stderr.write(result.stdout + result.stderr)
            runs.append((label, result, output))

        failures: list[str] = []
        rows: list[list[str]] = []
        for label, result, output in runs:
            if result.returncode != 0:
                failures.append(f"{label}: optc exited {result.returncode}")
                rows.append([label, "failed", "", "", "", "", "", "", ""])
                continue
            problems, nodes_after = check_output(built, output)
            failures += [f"{label}: {p}" for p in problems]
            ratio = result.peak_rss / model_bytes
            if label == runs[0][0] and ratio >= args.max_ratio:
                failures.append(
                    f"{label}: peak RSS {_mib(result.peak_rss)} is {ratio:.3f} of the model size "
                    f"{_size(model_bytes)} (limit {args.max_ratio})"
                )
            rows.append(
                [
                    label,
                    _mib(result.peak_rss),
                    f"{ratio:.3f}",
                    _mib(result.peak_anon),
                    _mib(result.peak_file),
                    f"{result.seconds:.1f}",
                    f"{built.nodes} -> {nodes_after}",
                    _size(model_size_bytes(output)),
                    "ok" if not problems else "; ".join(problems),
                ]
            )

        print()
        print(
            f"Command: `{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(runs[0][1].command))}`  "
        )
        print(
            f"Model: {_size(model_bytes)} on disk ({_size(built.weight_bytes)} of float32 weights in "
            f"{len(built.all_tensors)} external tensors, {len(built.dead_tensors)} of them dead; "
            f"over the 2 GiB protobuf limit: {'yes' if model_bytes > PROTOBUF_LIMIT else 'NO'}), "
            f"built in {build_seconds:.1f}s  "
        )
        print(
            f"Machine: {os.cpu_count()} CPUs, {_ram()}, Python {sys.version.split()[0]}, onnxruntime {_ort_version()}"
        )
        print()
        header = [
            "run",
            "peak RSS (wait4)",
            "peak RSS / model size",
            "peak anon (sampled)",
            "peak file-backed (sampled)",
            "wall s",
            "nodes",
            "output size",
            "output check",
        ]
        print(markdown_table(header, rows))
        print()
        if failures:
            for failure in failures:
                print(f"FAIL: {failure}")
            return 1
        print(f"PASS: peak RSS / model size is below {args.max_ratio} and the output is valid")
        return 0
    finally:
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _ram() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"{pages * size / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        return "RAM unknown"


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
