#!/usr/bin/env python3
"""Benchmark: quality of every compression recipe on text like and unlike the calibration data (SmolLM2-135M).

One table, the peers side by side, every model scored on three built-in texts
(`optc.runtime.text.named_text`), 4096 tokens each in windows of 256:

* `topics`: the eval split of `pydoc_data.topics`, the same source as the calibration data;
* `code`: standard-library Python source with its comments: the different-source text the issue's
  figures are reported on;
* `docstrings`: standard-library docstrings: the development text, on which defaults are chosen.

Calibration: `--samples`×`--seqlen` (32×256) tokens of the `calib` split of `pydoc_data.topics`
(`--calib builtin`), the same feeds for optc and onnxruntime's quantizers.

Rows:

* `fp32`: optc's ONNX export of the GGUF; `gguf-f32`: the same weights as an F32 GGUF in llama.cpp
  (the reference for the llama-quantize rows);
* `optc-<pipeline>`: `optc --passes=<pipeline>` as a child process (`w8a8`, `gptq` = `gptq{bits=4
  group=128}` with gptq's defaults, `w4a16`, `w3a16`; `--candidate NAME=PIPELINE` adds more);
* `ort-static` (onnxruntime quantize_static, as tools/bench_w8a8.py), `ort-rtn` and `ort-hqq`
  (onnxruntime's MatMulNBits quantizer at 4 bits, block 128, as tools/bench_w4.py);
* `optc-w3a16-gguf`: `optc --passes=w3a16 -o x.gguf` (for a GGUF output, llama.cpp's Q3_K_S mix with
  optc's importance matrix), scored in llama.cpp;
* `lq-Q4_K_M`, `lq-Q3_K_S`, `lq-Q3_K_M`: llama-quantize on the F32 GGUF, no importance matrix.

Ratios are to `fp32` on the same text (`gguf-f32` for the GGUF rows); `bpw` is the file's
bits per parameter of the fp32 model (the embedding table counted once). `--latency` adds the
interleaved-latency column of tools/bench_w8a8.py for the ONNX rows.

    python tools/bench_quality.py                                   # every row (about 10 minutes on 2 cores)
    python tools/bench_quality.py --variants optc-w8a8,ort-static --latency
    python tools/bench_quality.py --candidate 'rot-gptq=rotate,gptq{bits=4 group=128}'
    python tools/bench_quality.py --workdir /tmp/q --reuse          # score models already built in /tmp/q again
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
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _bench import add_text_options, markdown_table  # noqa: E402 - the benchmarks' shared helpers
from bench_w4 import ort_quantize  # noqa: E402 - the sibling benchmarks' builders and runners
from bench_w8a8 import (  # noqa: E402
    ORT_WORKAROUND,
    Row,
    add_candidates,
    build_rows,
    calibration_args,
    interleaved_latency,
    model_path,
    optc_build,
    ort_disabled_optimizers,
    ort_static,
    rows_json,
    timed_build,
    work_folder,
)

OPTC = {
    "optc-w8a8": "w8a8",
    "optc-gptq": "gptq{bits=4 group=128}",
    "optc-w4a16": "w4a16",
    "optc-w3a16": "w3a16",
}
#: optc's pipelines written as GGUF (`-o x.gguf`), scored in llama.cpp like the llama-quantize rows.
OPTC_GGUF = {"optc-w3a16-gguf": "w3a16"}
ORT = ("ort-static", "ort-rtn", "ort-hqq")
LLAMA = {"lq-Q4_K_M": "Q4_K_M", "lq-Q3_K_S": "Q3_K_S", "lq-Q3_K_M": "Q3_K_M"}
#: The rows that are GGUF files, scored against `gguf-f32`.
GGUF_ROWS = (*OPTC_GGUF, *LLAMA)
VARIANTS = ("fp32", "gguf-f32", *OPTC, *OPTC_GGUF, *ORT, *LLAMA)
TEXTS = ("topics", "code", "docstrings")

#: The issue's targets on the different-source text (`code`), ratios to fp32.
TARGETS = {"optc-w8a8": 1.015, "optc-gptq": 1.12, "optc-w4a16": 1.10, "optc-w3a16": 1.35, "optc-w3a16-gguf": 1.35}
SIZE_TARGETS = {"optc-w8a8": 0.3, "optc-gptq": 0.35, "optc-w4a16": 0.35}
SAME_SIZE = 1e-4  # relative file-size difference that still counts as equal bits per weight


def build(args: argparse.Namespace, gguf: Path, model: Any, fp32: Path, work: Path) -> list[Row]:
    source = work / "source-f32.gguf"

    def f32_gguf() -> Path:
        if not source.exists():
            from optc.backends.gguf import write_gguf

            write_gguf(model, source, show_progress=False, threads=2)
        return source

    def build_variant(row: Row, variant: str, out: Path) -> None:
        if variant == "gguf-f32":
            timed_build(row, source, lambda: (f32_gguf(), "optc's F32 GGUF of the same weights (llama.cpp)")[1])
        elif variant == "ort-static":
            timed_build(row, out, lambda: ort_static(fp32, out, model, args.samples, args.seqlen))
            row.note = "onnxruntime quantize_static: QDQ, per-channel s8 weights, MinMax s8 activations"
        elif variant in ORT:
            timed_build(row, out, lambda: ort_quantize(variant, fp32, out, model, args.samples, args.seqlen))
        elif variant in OPTC_GGUF:
            optc_build(row, gguf, out.with_suffix(".gguf"), OPTC_GGUF[variant], calibration_args(args))
        elif variant in LLAMA:
            from tests.backends.ggml_oracle import llama_quantize

            dst = out.with_suffix(".gguf")
            timed_build(row, dst, lambda: (llama_quantize(f32_gguf(), dst, LLAMA[variant], threads=2),
                                           f"llama-quantize {LLAMA[variant]}, no importance matrix")[1])
        else:
            optc_build(row, gguf, out, OPTC[variant], calibration_args(args))

    rows = build_rows(args, fp32, work, "bench_quality", build_variant)
    for row in rows:  # --reuse looks for .onnx; the llama.cpp rows are .gguf
        if row.path is None and args.reuse and row.variant in GGUF_ROWS:
            path = work / f"{row.variant}.gguf"
            if path.exists():
                row.path, row.note = path, f"reused {path}"
        if row.variant == "gguf-f32" and row.path is None and source.exists():
            row.path = source
    return rows


def evaluate_texts(rows: list[Row], args: argparse.Namespace, tokenizer: Any) -> dict[str, dict[str, float]]:
    """Perplexity of every row on every text: {variant: {text: ppl}}; sizes go on the rows."""
    from optc.evaluate import evaluate
    from optc.runtime.text import named_text

    texts = {name: named_text(name) for name in args.texts}
    ppl: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.path is None:
            continue
        print(f"bench_quality: evaluating {row.variant} ...", file=sys.stderr, flush=True)
        for name, text in texts.items():
            try:
                try:
                    result = evaluate(row.path, text, args.ctx, args.max_tokens, tokenizer, threads=args.threads)
                except Exception as exc:  # noqa: BLE001 - quantize_static's output trips onnxruntime's optimizer
                    if "output_dtype" not in str(exc):
                        raise
                    with ort_disabled_optimizers(ORT_WORKAROUND):
                        result = evaluate(row.path, text, args.ctx, args.max_tokens, tokenizer, threads=args.threads)
                    row.workaround = True
            except Exception as exc:  # noqa: BLE001 - one failing row must not stop the table
                row.note += f"; {name}: evaluation failed: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
                continue
            ppl.setdefault(row.variant, {})[name] = result.ppl
            row.size_bytes = result.size_bytes
            if name == "topics":
                row.ppl = result.ppl
    return ppl


def table(rows: list[Row], ppl: dict[str, dict[str, float]], texts: list[str], params: int, latency: bool) -> str:
    ref = {"onnx": ppl.get("fp32", {}), "gguf": ppl.get("gguf-f32", {})}
    base = next((r for r in rows if r.variant == "fp32"), None)
    header = ["recipe", *(f"{t} ppl (× fp32)" for t in texts), "size", "size / fp32", "bpw"]
    if latency:
        header.append("latency / fp32")
    header += ["compile", "notes"]
    body = []
    for r in rows:
        mine = ppl.get(r.variant, {})
        reference = ref["gguf"] if r.variant in GGUF_ROWS and ref["gguf"] else ref["onnx"]
        cells = [r.variant]
        for t in texts:
            if t in mine:
                ratio = f" ({mine[t] / reference[t]:.3f}×)" if reference.get(t) else ""
                cells.append(f"{mine[t]:.3f}{ratio}")
            else:
                cells.append("—")
        size = r.size_bytes
        cells.append(f"{size / 1e6:.1f} MB" if size else "—")
        cells.append(f"{size / base.size_bytes:.3f}×" if size and base and base.size_bytes else "—")
        cells.append(f"{size * 8 / params:.2f}" if size and params else "—")
        if latency:
            cells.append(f"{r.latency_s / base.latency_s:.3f}×" if r.latency_s and base and base.latency_s else "—")
        cells.append(f"{r.compile_s:.0f} s" if r.compile_s is not None else "—")
        cells.append(r.note)
        body.append(cells)
    return markdown_table(header, body)


def targets(rows: list[Row], ppl: dict[str, dict[str, float]]) -> list[str]:
    """The issue's targets on `code`, each row against its own reference (fp32 ONNX, or the F32 GGUF)."""
    bases = {"onnx": ppl.get("fp32", {}).get("code"), "gguf": ppl.get("gguf-f32", {}).get("code")}
    by = {r.variant: r for r in rows}
    fp32 = by.get("fp32")

    def ratio_of(variant: str) -> float | None:
        base = bases["gguf" if variant in GGUF_ROWS else "onnx"]
        value = ppl.get(variant, {}).get("code")
        return value / base if value is not None and base else None

    out = []
    for variant, limit in TARGETS.items():
        ratio = ratio_of(variant)
        if ratio is None:
            out.append(f"- {variant} code-text perplexity: not measured")
            continue
        out.append(f"- {variant} code-text perplexity / fp32: {ratio:.3f}× (target ≤ {limit}×) {'PASS' if ratio <= limit else 'FAIL'}")
        row, size_limit = by.get(variant), SIZE_TARGETS.get(variant)
        if size_limit and row and row.size_bytes and fp32 and fp32.size_bytes:
            size = row.size_bytes / fp32.size_bytes
            out.append(f"- {variant} size / fp32: {size:.3f}× (target ≤ {size_limit}×) {'PASS' if size <= size_limit else 'FAIL'}")
    q3s, theirs = by.get("lq-Q3_K_S"), ratio_of("lq-Q3_K_S")
    for variant in ("optc-w3a16", "optc-w3a16-gguf"):
        mine, row = ratio_of(variant), by.get(variant)
        if mine is None or theirs is None or not (row and row.size_bytes and q3s and q3s.size_bytes):
            continue
        # Equal bits per weight: a file may differ by a few bytes of metadata (an importance matrix's note).
        no_worse = mine <= theirs and row.size_bytes <= q3s.size_bytes * (1 + SAME_SIZE)
        out.append(f"- {variant} vs Q3_K_S on code: {mine:.3f}× at {row.size_bytes / 1e6:.1f} MB vs {theirs:.3f}× at "
                   f"{q3s.size_bytes / 1e6:.1f} MB: {'no worse in perplexity or size' if no_worse else 'worse in one'}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_options(parser, samples=32)
    parser.add_argument("--threads", type=int, default=None, help="runtime threads for evaluation (default: all CPUs)")
    parser.add_argument("--texts", default=",".join(TEXTS), help=f"comma-separated subset of {','.join(TEXTS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=PIPELINE",
                        help="also build and score optc with this pipeline as row NAME (repeatable)")
    parser.add_argument("--latency", action="store_true", help="also measure interleaved latency of the ONNX rows")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds (default 10)")
    parser.add_argument("--workdir", type=Path, help="where models are written (default: a temporary folder, removed)")
    parser.add_argument("--reuse", action="store_true", help="reuse models already in --workdir")
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.texts = [t.strip() for t in args.texts.split(",") if t.strip()]
    add_candidates(parser, args, OPTC)
    unknown = [v for v in args.variants if v not in (*VARIANTS, *OPTC)]
    if unknown or not set(args.texts) <= set(TEXTS):
        parser.error(f"unknown variants {unknown} or texts {args.texts}; choose from {', '.join(VARIANTS)} / {', '.join(TEXTS)}")
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")
    if any(v in GGUF_ROWS for v in args.variants) and "gguf-f32" not in args.variants:
        args.variants.insert(1, "gguf-f32")

    from optc.evaluate import load_tokenizer
    from optc.frontends import load_input

    gguf = model_path()
    with work_folder(args.workdir, "bench-quality-") as work:
        start = time.perf_counter()
        model = load_input(gguf)
        fp32 = Path(model.meta["optc.source_onnx"])
        params = sum(int(v.const_value.size) for v in model.graph.initializers.values()
                     if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point())
        print(f"bench_quality: model loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        tokenizer = load_tokenizer(fp32)
        rows = build(args, gguf, model, fp32, work)
        ppl = evaluate_texts(rows, args, tokenizer)
        if args.latency:
            interleaved_latency([r for r in rows if r.path is not None and r.path.suffix == ".onnx"], args, tokenizer)
        load = os.getloadavg()
        print(f"\n## SmolLM2-135M quality on three texts ({args.samples}×{args.seqlen} calibration tokens of "
              f"pydoc_data.topics' calib split; {args.max_tokens} tokens per text, windows of {args.ctx}; "
              f"load average {load[0]:.1f})\n")
        print(table(rows, ppl, args.texts, params, args.latency))
        print("\nTargets (on `code`, the different-source text):")
        print("\n".join(targets(rows, ppl)))
        if args.json:
            args.json.write_text(json.dumps({"rows": rows_json(rows), "ppl": ppl}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
