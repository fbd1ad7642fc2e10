"""The TensorRT backend: explicit-quantization ONNX that TensorRT accepts, and the engine where TensorRT is installed.

`--target tensorrt` (or an output ending in `.engine`/`.plan`) runs the
`lower-tensorrt` legalization (backends/tensorrt/lower_tensorrt.py; never the
onnxruntime integer lowering), checks the result against TensorRT's rules
(`trt-check`, backends/tensorrt/trt_check.py) and writes it. Behaviour by
output suffix and by whether the `tensorrt` Python package (the optional
extra `optc[tensorrt]`) can be imported:

| `-o`                 | tensorrt installed                                  | not installed |
|----------------------|-----------------------------------------------------|---------------|
| `m.onnx`             | writes `m.onnx`, builds `m.engine` beside it        | writes `m.onnx` and `m.trtexec.txt` |
| `m.engine`/`m.plan`  | writes `m.onnx` (the engine's source) and the engine | writes `m.onnx` and `m.trtexec.txt` (the engine is not built: said in one line, exit 0) |

`m.trtexec.txt` holds a ready command line: `trtexec --onnx=m.onnx
--saveEngine=m.engine --stronglyTyped` plus `--sparsity=enable` when any
weight is annotated 2:4 and shape ranges for dynamic inputs (`batch`-like axes
1..8, others 1..2048 with 256 as the optimum). The engine build in Python
does the same: a strongly-typed network (`STRONGLY_TYPED`: precisions come
from the Q/DQ, no precision flags), `SPARSE_WEIGHTS` where annotated, one
optimization profile, detailed profiling verbosity so that the engine
inspector can list the layers that run in INT8/FP8.

The ONNX is always loaded into onnxruntime before it is kept (standard Q/DQ
runs there), and a rule of severity `error` found by `trt-check` stops the
run: TensorRT would reject the file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

from optc.architectures import max_positions
from optc.backends.base import Artifact, Backend, register_backend
from optc.backends.tensorrt.trt_check import check_tensorrt, summarize
from optc.errors import OptcError, WriteError, first_line
from optc.ir import Model, annotation, model_metadata, model_size_bytes, save_model, verify
from optc.ir.annotations import HF_CONFIG, SPARSITY, TENSORRT_LOWERING
from optc.ir.io import remove_model
from optc.passes.infra.context import PassContext

ENGINE_SUFFIXES = (".engine", ".plan")
#: Shape ranges (min, opt, max) for dynamic input axes: batch-like axes, then every other axis.
BATCH_RANGE = (1, 1, 8)
OTHER_RANGE = (1, 256, 2048)


def tensorrt_available() -> bool:
    """Whether the `tensorrt` Python package is installed (it is not imported here)."""
    return importlib.util.find_spec("tensorrt") is not None


def uses_2_4(model: Model) -> bool:
    """True when any weight or weighted op is annotated with the 2:4 pattern."""
    def is_2_4(obj: Any) -> bool:
        info = annotation(obj, SPARSITY)
        return isinstance(info, dict) and info.get("pattern") == "2:4"

    return any(is_2_4(v) for v in model.graph.initializers.values()) or any(is_2_4(n) for n in model.graph)


def shape_profile(model: Model) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min/opt/max shapes of every graph input with a dynamic axis; a model with a learned position table
    (gpt2, bert) gets no sequence longer than the table."""
    limit = max_positions(model_metadata(model, HF_CONFIG) or {})
    other = OTHER_RANGE if limit is None else tuple(min(n, limit) for n in OTHER_RANGE)
    profile = {}
    for value in model.graph.inputs:
        if value.shape is None or value.name in model.graph.initializers:
            continue
        dims = list(value.shape)
        if all(isinstance(d, int) for d in dims):
            continue
        lo, opt, hi = [], [], []
        for i, dim in enumerate(dims):
            if isinstance(dim, int):
                a = b = c = dim
            else:
                name = str(getattr(dim, "value", dim) or "")
                batch = "batch" in name.lower() or (not name and i == 0)
                a, b, c = BATCH_RANGE if batch else other
            lo.append(a)
            opt.append(b)
            hi.append(c)
        profile[value.name] = (lo, opt, hi)
    return profile


def trtexec_command(onnx_path: Path, engine_path: Path, *, sparse: bool,
                    profile: dict[str, tuple[list[int], list[int], list[int]]]) -> str:
    """A ready `trtexec` line: strongly typed, sparse weights where annotated, shape ranges for dynamic inputs."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    if sparse:
        args.append("--sparsity=enable")
    if profile:
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{name}:{'x'.join(map(str, shapes[k]))}" for name, shapes in profile.items()))
    return shlex.join(args)


@dataclasses.dataclass
class EngineReport:
    """What the engine build produced: its size and which layers run in which precision."""

    path: Path
    size_bytes: int
    layers: int
    int8_layers: int
    fp8_layers: int
    int4_layers: int
    sparse_layers: int
    tensorrt_version: str

    def line(self) -> str:
        return (f"TensorRT {self.tensorrt_version} built {self.path} ({self.size_bytes / 1e6:.2f} MB): "
                f"{self.layers} layers, {self.int8_layers} in INT8, {self.fp8_layers} in FP8, "
                f"{self.int4_layers} with INT4 weights, {self.sparse_layers} with sparse tactics")


class _Unavailable(Exception):
    """TensorRT is installed but cannot build here (no GPU, no CUDA): fall back to the command line."""


def layer_precisions(info: dict) -> tuple[int, int, int, int, int]:
    """Layers, and those reading INT8 / FP8 tensors, holding INT4 weights or using a sparse tactic.

    `info` is the engine inspector's JSON (`LayerInformationFormat.JSON`) of an
    engine built with `ProfilingVerbosity.DETAILED`: one dict per layer with
    its inputs' "Format/Datatype" strings and its "TacticName". (Written from
    TensorRT's documented inspector format; not yet run against a real engine
    here: no GPU.)
    """
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    counts = [0, 0, 0, 0]
    real = 0
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        real += 1
        formats = " ".join(str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []) if isinstance(t, dict))
        formats = formats.lower()
        tactic = str(layer.get("TacticName", "")).lower()
        counts[0] += bool(re.search(r"\bint8\b", formats))
        counts[1] += bool(re.search(r"\bfp8\b|float8|e4m3", formats))
        counts[2] += bool(re.search(r"\bint4\b", json.dumps(layer).lower()))  # INT4 weights are constants, not inputs
        counts[3] += "sparse" in tactic
    return real, *counts


def build_engine(onnx_path: Path, engine_path: Path, *, sparse: bool,
                 profile: dict[str, tuple[list[int], list[int], list[int]]]) -> EngineReport:
    """Build a strongly-typed engine from `onnx_path` and write it atomically to `engine_path`."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install raises anything
        raise _Unavailable(f"tensorrt cannot be imported ({first_line(exc)})") from exc
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001
        raise _Unavailable(f"no TensorRT builder on this machine ({first_line(exc)})") from exc
    if builder is None:
        raise _Unavailable("no TensorRT builder on this machine (no CUDA device?)")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise OptcError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[0] if errors else 'no error given'}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OptcError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    data = bytes(memoryview(serialized))
    _write_atomic(engine_path, data)
    layers = (0, 0, 0, 0, 0)
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        inspector = engine.create_engine_inspector()
        layers = layer_precisions(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)))
    except Exception as exc:  # noqa: BLE001 - the engine is built; only the layer listing failed
        raise OptcError(f"TensorRT built {engine_path} but its layers could not be listed: {first_line(exc)}") from exc
    return EngineReport(engine_path, len(data), *layers, tensorrt_version=str(getattr(trt, "__version__", "?")))


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _onnx_and_engine(output: Path) -> tuple[Path, Path]:
    """(the ONNX, the engine) written for `-o output`."""
    if output.suffix.lower() in ENGINE_SUFFIXES:
        return output.with_suffix(".onnx"), output
    return output, output.with_suffix(".engine")


def _command_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".trtexec.txt")



@register_backend
class TensorRTBackend(Backend):
    """TensorRT explicit-quantization ONNX (checked by trt-check and onnxruntime), plus the engine when TensorRT is installed."""

    name = "tensorrt"
    suffixes = (".onnx", *ENGINE_SUFFIXES)
    legalize = "lower-tensorrt"

    def written_files(self, output: Path, *, generation: bool = False) -> list[tuple[Path, str]]:
        """The ONNX and its data, the engine, and the trtexec command file (see the module docstring)."""
        onnx_path, engine_path = _onnx_and_engine(output)
        data = onnx_path.with_name(onnx_path.name + ".data")
        command = _command_path(onnx_path)
        if output.suffix.lower() in ENGINE_SUFFIXES:
            files = [(output, "the engine"), (onnx_path, f"its ONNX {onnx_path}")]
        else:
            files = [(output, "the output"), (engine_path, f"its engine {engine_path}")]
        return [*files, (data, f"its external data file {data}"), (command, f"its trtexec command file {command}")]

    def lower(self, model: Model, output: Path, context: PassContext) -> Artifact:
        verify(model, where="before lowering to tensorrt")
        engine_output = output.suffix.lower() in ENGINE_SUFFIXES
        onnx_path, engine_path = _onnx_and_engine(output)

        findings = check_tensorrt(model)
        errors = [f for f in findings if f.rule.severity == "error"]
        if errors:
            raise OptcError(f"the model breaks {len(errors)} TensorRT rule(s) that lower-tensorrt cannot fix; "
                            f"first: {errors[0]} (run --passes=trt-check for all)")
        checks = [f"lower-tensorrt: {note}" for note in model_metadata(model, TENSORRT_LOWERING) or []]
        checks.append(f"trt-check: {summarize(findings)}")
        checks += [f"trt-check: {f}" for f in findings[:20]]

        def check(staged: Path) -> None:
            if context.get("backend.skip_runtime_check"):
                return
            from optc.runtime.ort import runtime_check

            checks.append(runtime_check(staged, onnx_path, "TensorRT-lowered"))

        save_model(model, onnx_path, check=check)
        sparse = uses_2_4(model)
        profile = shape_profile(model)
        command = trtexec_command(onnx_path, engine_path, sparse=sparse, profile=profile)
        artifact_path = onnx_path
        fallback = "tensorrt is not installed"
        if tensorrt_available() and not context.get("backend.skip_engine_build"):
            try:
                report = build_engine(onnx_path, engine_path, sparse=sparse, profile=profile)
            except _Unavailable as exc:
                fallback = str(exc)
            except OptcError:
                remove_model(onnx_path)  # a failed run leaves no output
                raise
            else:
                checks.append(report.line() + (" (sparse weights enabled)" if sparse else ""))
                if engine_output:
                    artifact_path = engine_path
                return Artifact(artifact_path, self.name, model_size_bytes(artifact_path) if artifact_path == onnx_path
                                else report.size_bytes, checks)
        command_path = _command_path(onnx_path)
        _write_atomic(command_path, (
            f"# TensorRT engine build for {onnx_path.name} (written by optc; {fallback} where optc ran).\n"
            f"# Strongly typed: precisions come from the Q/DQ nodes."
            + (" Weights annotated 2:4 are sparse." if sparse else "") + "\n"
            + command + "\n").encode())
        not_built = f"the engine {engine_path} was not built" if engine_output else "no engine built"
        checks.append(f"{fallback}: wrote {onnx_path} and {command_path}, {not_built}; build it with: {command}")
        return Artifact(artifact_path, self.name, model_size_bytes(onnx_path), checks)


__all__ = ["EngineReport", "TensorRTBackend", "build_engine", "layer_precisions", "shape_profile",
           "tensorrt_available", "trtexec_command", "uses_2_4"]

# The target's passes register on import (after the backend, which they may use).
from optc.backends.tensorrt import lower_tensorrt, trt_check  # noqa: E402, F401
