#!/usr/bin/env python3
"""Perplexity of quantization pipelines on the default model (SmolLM2-135M-Instruct), one table.

    python tools/quant_sweep.py                                  # the default sweep below
    python tools/quant_sweep.py 'w8a8' 'quantize{calib=mse}'     # chosen pipelines
    python tools/quant_sweep.py --samples 32 --max-tokens 8192 w8a8

Each pipeline compiles a fresh load of the model (`optc.frontends.load_input`,
export cached in ~/.cache/optc) with `optc.driver.compile_model`, calibration
`--calib builtin` (the calib split of pydoc_data.topics; `--samples` windows of
256 tokens), into a temporary folder; then `optc.evaluate.evaluate` scores the
held-out eval split (windows of `--ctx` tokens, the first `--max-tokens`
tokens) with the fp32 export's tokenizer, and the fp32 export itself is the
first row. Rows are printed as they finish (and appended as JSON lines to
`--jsonl` if given). Not a test: it takes minutes per pipeline on a CPU.

`--reference` runs every onnxruntime session with graph optimizations off, so
Q/DQ executes as written (DequantizeLinear, then a float MatMul): the numbers
then measure the quantization itself. With optimizations on (the default, what
a deployment sees) onnxruntime fuses Q/DQ into integer kernels whose rounding
and, on CPUs without VNNI, u8s8 saturation move perplexity by a few tenths of
a percent either way (measured on SmolLM2 W8A8: 19.82 reference, 19.76-19.85
fused depending on the lowering).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_SWEEP = [
    "quantize{calib=minmax}",
    "quantize{calib=percentile}",
    "quantize{calib=mse}",
    "smoothquant{alpha=0.8},quantize{calib=minmax}",
    "smoothquant{alpha=0.8},quantize{calib=mse}",
    "smoothquant{alpha=0.8},quantize{calib=mse int16=down_proj}",
    "smoothquant{alpha=0.8},quantize{calib=mse exclude=lm_head,down_proj}",
    "w8a8",
    "fp8",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="*", help="pipelines to measure (default: a sweep of the 8-bit recipes)")
    parser.add_argument("--model", help="model path (default: the installed SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--no-baseline", action="store_true", help="skip the fp32 row")
    parser.add_argument("--jsonl", type=Path, help="append each row as a JSON line here")
    parser.add_argument("--reference", action="store_true", help="onnxruntime graph optimizations off (Q/DQ as written)")
    args = parser.parse_args(argv)

    if args.reference:
        import optc.runtime.ort as ort_backend

        plain = ort_backend.open_session
        ort_backend.open_session = lambda path, optimize=True, threads=0: plain(path, optimize=False, threads=threads)

    from optc.driver import CompileOptions, compile_model
    from optc.evaluate import evaluate, load_tokenizer
    from optc.frontends import load_input
    from optc.frontends.models import default_model_path

    path = Path(args.model) if args.model else default_model_path()
    source = load_input(path).meta["optc.source_onnx"]
    tokenizer = load_tokenizer(source)
    rows = [] if args.no_baseline else [("fp32", None)]
    rows += [(p, p) for p in (args.pipelines or DEFAULT_SWEEP)]
    base = None
    print(f"| {'pipeline':<72} | {'ppl':>8} | {'x fp32':>7} | {'MB':>6} | {'ms/window':>9} |")
    print(f"|{'-' * 74}|{'-' * 10}|{'-' * 9}|{'-' * 8}|{'-' * 11}|")
    with tempfile.TemporaryDirectory(prefix="optc-sweep-") as folder:
        for i, (label, pipeline) in enumerate(rows):
            start = time.perf_counter()
            if pipeline is None:
                target = Path(source)
            else:
                options = CompileOptions(passes=pipeline, calib="builtin", calib_samples=args.samples, calib_seqlen=256)
                target = compile_model(load_input(path), Path(folder) / f"m{i}.onnx", options).artifact.path
            result = evaluate(target, None, args.ctx, args.max_tokens, tokenizer)
            base = result.ppl if pipeline is None else base
            ratio = f"{result.ppl / base:.3f}" if base else "-"
            print(f"| {label:<72} | {result.ppl:8.3f} | {ratio:>7} | {result.size_bytes / 1e6:6.1f} | "
                  f"{result.median_latency_s * 1e3:9.0f} |", flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps({
                        "pipeline": label, "ppl": result.ppl, "ratio": result.ppl / base if base else None,
                        "size_bytes": result.size_bytes, "latency_s": result.median_latency_s,
                        "samples": args.samples, "reference": args.reference, "seconds": time.perf_counter() - start,
                    }) + "\n")
            if pipeline is not None:
                for leftover in Path(folder).glob(f"m{i}.onnx*"):
                    leftover.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
