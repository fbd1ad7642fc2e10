#!/usr/bin/env python3
"""Benchmark: weight-only low-bit quantization of SmolLM2-135M, optc against onnxruntime's MatMulNBits quantizer.

Side by side, on the same model:

* `fp32`: the float model (optc's ONNX export of the GGUF);
* optc pipelines as child processes (`optc --passes=...`, the ort backend lowers to MatMulNBits):
  `optc-rtn`, `optc-gptq`, `optc-awq`, `optc-awq+gptq` at W4 g128 (symmetric and asymmetric),
  `optc-gptq-w3` (W3 g128) and `optc-rtn-w8` (W8 per channel), and the named pipelines
  `optc-w4a16` (gptq asymmetric + int8 embedding table) and `optc-w4a16-h8` (+ the lm_head in W8A8);
* onnxruntime's `MatMulNBitsQuantizer` (onnxruntime.quantization.matmul_nbits_quantizer) at 4 bits,
  block 128: `ort-rtn` (its default algorithm, asymmetric as its default), `ort-rtn-sym`, `ort-hqq`,
  and `ort-gptq` (with the same calibration data; slow, only with --ort-gptq).

Calibration: the `calib` split of the built-in text, `--samples` windows of `--seqlen` tokens (16×256).
Every model is scored in this process by `optc.evaluate.evaluate`: perplexity on the held-out `eval`
split (4096 tokens, windows of 256), size on disk; latency is the median of `--rounds` interleaved
rounds of one 256-token window (all models open at once and take turns, so load on the machine hits
them alike). Compile time is the child's wall time (for onnxruntime: the quantizer call).

    python tools/bench_w4.py                               # every variant above but ort-gptq
    python tools/bench_w4.py --variants optc-gptq,ort-rtn  # a subset (fp32 is always added)
    python tools/bench_w4.py --candidate 'mine=gptq{damp=0.05}'
    python tools/bench_w4.py --workdir W --reuse           # score models already built in W again
    python tools/bench_w4.py --layer-timing 4096           # GPTQ math on one 4096x4096 layer: CPU, and CUDA if present
    python tools/bench_w4.py --stack-timing 7b             # GPTQ of a 7B-shaped decoder stack on the fastest device
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_w8a8 import (  # noqa: E402 - the sibling benchmark's runner, evaluation and table
    Row,
    add_candidates,
    add_run_options,
    build_rows,
    calibration_args,
    measure_rows,
    model_path,
    optc_build,
    rows_json,
    table,
    target_check,
    timed_build,
    work_folder,
)

OPTC = {
    "optc-rtn": "rtn",
    "optc-gptq": "gptq",
    "optc-awq": "awq",
    "optc-awq+gptq": "awq{quantize=false},gptq",
    "optc-rtn-asym": "rtn{symmetric=false}",
    "optc-gptq-asym": "gptq{symmetric=false}",
    "optc-awq-asym": "awq{symmetric=false}",
    "optc-awq+gptq-asym": "awq{quantize=false symmetric=false},gptq{symmetric=false}",
    "optc-gptq-w3": "gptq{bits=3 symmetric=false}",
    "optc-rtn-w8": "rtn{bits=8 group=-1}",
    "optc-w4a16": "w4a16",  # the named pipelines: gptq asym + int8 embedding table
    "optc-w4a16-h8": "w4a16-h8",  # ... + the lm_head in W8A8 on the integer kernel
}
ORT = ("ort-rtn", "ort-rtn-sym", "ort-hqq", "ort-gptq")
DEFAULT = ("fp32", *OPTC, "ort-rtn", "ort-rtn-sym", "ort-hqq")

PPL_TARGET = 1.15
LATENCY_TARGET = 1.0
SIZE_TARGET = 0.35
GPTQ_SECONDS = 300.0


def ort_quantize(variant: str, fp32: Path, out: Path, model: Any, samples: int, seqlen: int) -> str:
    """onnxruntime's MatMulNBits quantizer at 4 bits, block 128; returns a note."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    proto = onnx.load(str(fp32))
    if variant == "ort-hqq":
        config, note = mnq.HQQWeightOnlyQuantConfig(block_size=128, bits=4), "HQQ, 4 bits, block 128"
    elif variant == "ort-gptq":
        from onnxruntime.quantization import CalibrationDataReader

        from optc.runtime.calibration import iter_samples

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter_samples(model, "builtin", samples, seqlen)

            def get_next(self):
                return next(self.it, None)

        config, note = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=128), "GPTQ, block 128"
    else:
        symmetric = variant == "ort-rtn-sym"
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=symmetric, bits=4)
        note = f"default (RTN), 4 bits, block 128, {'symmetric' if symmetric else 'asymmetric (its default)'}"
    quantizer = mnq.MatMulNBitsQuantizer(proto, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    return note


def build(args: argparse.Namespace, gguf: Path, model: Any, fp32: Path, work: Path) -> list[Row]:
    def build_variant(row: Row, variant: str, out: Path) -> None:
        if variant in ORT:
            timed_build(row, out, lambda: ort_quantize(variant, fp32, out, model, args.samples, args.seqlen))
        else:
            optc_build(row, gguf, out, OPTC[variant], calibration_args(args))

    return build_rows(args, fp32, work, "bench_w4", build_variant)


def targets(rows: list[Row]) -> list[str]:
    by = {r.variant: r for r in rows}
    base = by.get("fp32")
    if base is None or base.ppl is None:
        return ["- no fp32 baseline measured"]
    four = [r for r in rows if r.variant in OPTC and "w3" not in r.variant and "w8" not in r.variant and r.ppl]
    best = min(four, key=lambda r: r.ppl, default=None)
    out = []
    check = target_check
    name = best.variant if best else "—"
    out.append(check(f"W4 g128 perplexity / fp32 (best optc: {name})", best.ppl if best else None, base.ppl, PPL_TARGET))
    out.append(check(f"W4 latency / fp32 ({name})", best.latency_s if best else None, base.latency_s, LATENCY_TARGET))
    out.append(check(f"W4 file size / fp32 ({name})", best.size_bytes if best else None, base.size_bytes, SIZE_TARGET))
    for named in ("optc-w4a16", "optc-w4a16-h8"):
        row = by.get(named)
        if row is not None and row.ppl is not None:
            out.append(check(f"{named} perplexity / fp32", row.ppl, base.ppl, PPL_TARGET))
            out.append(check(f"{named} latency / fp32", row.latency_s, base.latency_s, LATENCY_TARGET))
            out.append(check(f"{named} file size / fp32", row.size_bytes, base.size_bytes, SIZE_TARGET))
    gptq = by.get("optc-gptq")
    if gptq is not None and gptq.compile_s is not None:
        verdict = "PASS" if gptq.compile_s <= GPTQ_SECONDS else "FAIL"
        out.append(f"- optc gptq compile (whole optc run, calibration included): {gptq.compile_s:.0f} s "
                   f"(target < {GPTQ_SECONDS:.0f} s) {verdict}")
    return out


def layer_timing(size: int, repeats: int = 3) -> list[str]:
    """Seconds for GPTQ (W4 g128, act-order) of one random size×size layer on the CPU and, when present, CUDA."""
    import torch

    from optc.passes.lowbit import Grid, torch_threads
    from optc.passes.transforms.gptq import factor, gptq_quantize

    lines = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in devices:
        device = torch.device(name)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2 * size, size, generator=g).to(device)
        w = torch.randn(size, size, generator=g).to(device)
        hess = 2 * x.T @ x / x.shape[0]
        times = []
        with torch_threads(device):
            for _ in range(repeats if name == "cuda" else 1):
                if name == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                gptq_quantize(w, factor(hess), 128, Grid(4), clip=True)
                if name == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        best = min(times)
        lines.append(f"- {name}: {best:.2f} s per {size}x{size} layer ({1 / best:.2f} layers/s)")
    return lines


def stack_timing(shape_name: str, layers: int | None = None, tokens: int = 128 * 2048) -> list[str]:
    """Seconds for GPTQ (W4 g128, act-order, clip search) of every linear layer of a Llama-shaped decoder stack
    (`bench_scale.SHAPES`), on CUDA when present, else the CPU: per decoder layer, the Hessians of its four
    inputs (q/k/v share one, gate/up one) accumulated from `tokens` random activation rows in chunks, then
    each weight's factor and solve. Random weights: the time, not the codes, is the figure. With `layers`
    fewer than the shape's, the total is also extrapolated to all of them."""
    import torch
    from bench_scale import SHAPES

    from optc.passes.lowbit import Grid, torch_threads
    from optc.passes.transforms.gptq import factor, gptq_quantize

    shape = SHAPES[shape_name]
    count = min(layers or shape.layers, shape.layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    # (input width, the weights [N, K] that read that input)
    inputs = [(shape.hidden, [shape.hidden, kv, kv]), (shape.hidden, [shape.hidden]),
              (shape.hidden, [shape.intermediate, shape.intermediate]), (shape.intermediate, [shape.hidden])]
    g = torch.Generator(device=device).manual_seed(0)
    chunk = 4096

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    per_layer = []
    with torch_threads(device):
        threads = torch.get_num_threads()
        for _ in range(count):
            sync()
            start = time.perf_counter()
            for width, outs in inputs:
                hess = torch.zeros(width, width, device=device)
                for done in range(0, tokens, chunk):
                    x = torch.randn(min(chunk, tokens - done), width, device=device, generator=g)
                    hess.addmm_(x.T, x, alpha=2.0 / tokens)
                for n in outs:
                    w = torch.randn(n, width, device=device, generator=g) * 0.02
                    gptq_quantize(w, factor(hess), 128, Grid(4), clip=True, reuse=True)
                del hess
            sync()
            per_layer.append(time.perf_counter() - start)
    total = sum(per_layer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} torch thread(s)"
    lines = [f"- {name}: GPTQ W4 g128 of {count} of {shape_name}'s {shape.layers} decoder layers "
             f"({7 * count} weights, Hessians from {tokens} rows): {total:.1f} s, {total / count:.2f} s per layer "
             f"(first {per_layer[0]:.2f} s)"]
    if count < shape.layers:
        steady = sum(per_layer[1:]) / (count - 1) if count > 1 else per_layer[0]
        lines.append(f"- all {shape.layers} layers at that rate: {per_layer[0] + steady * (shape.layers - 1):.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--reuse", action="store_true", help="reuse models already in --workdir")
    parser.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated subset of {','.join((*OPTC, *ORT))}")
    parser.add_argument("--ort-gptq", action="store_true", help="also run onnxruntime's GPTQ (very slow on 2 cores)")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=PIPELINE",
                        help="also build and score optc with this pipeline as row NAME (repeatable)")
    parser.add_argument("--workdir", type=Path, help="where models are written (default: a temporary folder, removed)")
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON")
    parser.add_argument("--layer-timing", type=int, metavar="SIZE", help="only time GPTQ on one SIZE x SIZE layer")
    parser.add_argument("--stack-timing", metavar="SHAPE", help="only time GPTQ of a decoder stack of this "
                        "tools/bench_scale.py shape (7b: Llama-2-7B's), on CUDA when present")
    parser.add_argument("--stack-layers", type=int, help="with --stack-timing: time this many decoder layers and "
                        "extrapolate")
    parser.add_argument("--stack-tokens", type=int, default=128 * 2048,
                        help="with --stack-timing: activation rows per Hessian (default 128x2048, GPTQ's calibration)")
    args = parser.parse_args(argv)
    if args.layer_timing:
        print("\n".join(layer_timing(args.layer_timing)))
        return 0
    if args.stack_timing:
        print("\n".join(stack_timing(args.stack_timing, args.stack_layers, args.stack_tokens)))
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.ort_gptq and "ort-gptq" not in args.variants:
        args.variants.append("ort-gptq")
    add_candidates(parser, args, OPTC)
    unknown = [v for v in args.variants if v not in ("fp32", *OPTC, *ORT)]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")
    args.eval_info = args.latency_info = ""

    gguf = model_path()
    with work_folder(args.workdir, "bench-w4-") as work:
        rows = measure_rows(args, gguf, work, build, "bench_w4")
        load = os.getloadavg()
        print(f"\n## SmolLM2-135M weight-only low-bit benchmark ({args.samples}×{args.seqlen} calibration tokens)\n")
        print(f"Perplexity: {args.eval_info}. Latency: {args.latency_info}; load average {load[0]:.1f} on "
              f"{os.cpu_count()} CPUs at the end. Optc W4 rows: 4 bits, group 128 (symmetric unless -asym); "
              f"lm_head (tied to the embedding table) stays float.\n")
        print(table(rows))
        print("\nTargets:")
        print("\n".join(targets(rows)))
        if args.json:
            data = {"rows": rows_json(rows),
                    "eval": args.eval_info, "latency": args.latency_info}
            args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
