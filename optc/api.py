"""The Python API that deployment builds embed: `optc.compile(...)`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optc.driver import CompileOptions, CompileResult, compile_file, compile_model
from optc.errors import OptcError


def compile(  # noqa: A001 - the API's name, like torch.compile
    model: Any,
    *,
    output: str | Path,
    passes: str | None = None,
    target: str | None = None,
    calib: str | None = None,
    calib_samples: int = 16,
    calib_seqlen: int = 256,
    calib_blocks: str = "auto",
    example_inputs: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    seed: int = 0,
    verify_each: bool = False,
    report: str | Path | None = None,
    remarks: str | None = None,
    strict: bool = False,
    memory_budget: int | str | None = None,
    kv_cache: bool = False,
) -> CompileResult:
    """Compile a model and write the artifact; returns its path (`.artifact.path`) and a summary.

    `model` is a path (`.onnx` file, Hugging Face directory, `.gguf` file), an
    `optc.ir.Model`, or a `torch.nn.Module` together with `example_inputs`
    (a tensor or a tuple of tensors; the first axis of each is dynamic unless
    `dynamic_axes` says otherwise). Raises `optc.errors.OptcError` on failure.

    The passes' remarks are on `.remarks` (`optc.passes.Remark`); `remarks=REGEX` also prints those
    of the passes it names, and `strict=True` fails on a `missed` remark (`optc.passes.RemarkError`).
    `dynamic_axes` says otherwise). `memory_budget` (bytes, or text such as `"8G"`;
    default: the memory available) refuses a path input whose load would need more, and decides whether
    calibration runs a decoder block by block (`calib_blocks="auto"`; `"on"`, `"off"` force it).
    `kv_cache=True` exports a Hugging Face or GGUF causal LM with its KV cache, and an `.onnx`
    output becomes a folder onnxruntime-genai loads (`genai_config.json` and the tokenizer beside it).
    Raises `optc.errors.OptcError` on failure.
    """
    options = CompileOptions(
        passes=passes,
        target=target,
        calib=calib,
        calib_samples=calib_samples,
        calib_seqlen=calib_seqlen,
        calib_blocks=calib_blocks,
        seed=seed,
        verify_each=verify_each,
        report=Path(report) if report is not None else None,
        remarks=remarks,
        strict=strict,
        memory_budget=memory_budget,
        kv_cache=kv_cache,
    )
    if isinstance(model, (str, Path)):
        return compile_file(model, output, options)
    from optc.ir import Model

    if isinstance(model, Model):
        return compile_model(model, output, options)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise OptcError("compiling a torch.nn.Module needs example_inputs (a tensor or a tuple of tensors)")
        from optc.frontends.torch import export_module

        ir_model = export_module(
            model, example_inputs, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes
        )
        return compile_model(ir_model, output, options)
    raise OptcError(f"cannot compile a {type(model).__name__}: give a path, an optc.ir.Model or a torch.nn.Module")
