#!/usr/bin/env python3
"""Benchmark: pruning, sparsity and low-rank passes on SmolLM2-135M, every method side by side.

One table, every variant compiled from the same float model with the same
calibration data (`--calib builtin`: `--samples` windows of `--seqlen` tokens)
and scored by `optc.evaluate.evaluate` on the held-out eval split
(`--max-tokens` tokens, windows of `--ctx`):

* `dense`: the float model (optc's ONNX export of the GGUF);
* `sparsify{pattern=2:4|unstructured method=magnitude|wanda|sparsegpt}`;
* `prune-heads{ratio=0.25}` (and `prune-ffn{ratio=0.25}`);
* `lowrank{energy=E whiten=true}` for several energies (parameters and
  perplexity also plotted as a curve, `lowrank.png` in `--workdir`).

Then the issue's checks:

* SparseGPT < Wanda < magnitude in perplexity, for 2:4 and for 50% unstructured;
* every weight `sparsify` touched has at most 2 non-zeros per 4 along K, also
  after a later `quantize` pass (`check_nm_sparsity`), and the lm_head and
  embeddings are untouched;
* `prune-heads{ratio=0.25}`: parameters removed against the count expected
  from the head geometry, the model runs in onnxruntime, and the median
  latency of a `--ctx`-token window against dense, both sessions taking turns
  in this process (`--rounds` rounds, medians);
* the same on a BERT-like encoder (random weights, `--bert-*` geometry,
  exported by optc's transformers frontend, calibrated on random tokens).

    python tools/bench_pruning.py                       # everything (about 15 minutes on 2 cores)
    python tools/bench_pruning.py --only sparsify       # just the sparsity rows
    python tools/bench_pruning.py --energies 0.9,0.95 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import add_text_options  # noqa: E402 - the benchmarks' shared helpers (tools/_bench.py)

SPARSIFY = [
    (pattern, method)
    for pattern in ("2:4", "unstructured")
    for method in ("magnitude", "wanda", "sparsegpt")
]


def param_count(model) -> int:
    return sum(
        int(np.prod(v.shape)) for v in model.graph.initializers.values()
        if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point()
    )


def share_hessians() -> None:
    """Compute the `hessian` analysis once per parameter set for the whole benchmark.

    Valid here because every variant's first pass reads it on the same dense model with the same
    calibration data; it saves one calibration run per variant.
    """
    from optc.passes.analyses import hessian

    original = hessian.Hessian.run
    memo: dict = {}

    def run(self, model, am):
        key = tuple(sorted(self.params.items()))
        if key not in memo:
            memo[key] = original(self, model, am)
        return memo[key]

    hessian.Hessian.run = run


def compile_variant(dense: Path, pipeline: str, calib: dict, out: Path):
    from optc.ir import load_model, save_model
    from optc.passes import AnalysisManager, PassContext, parse_pipeline

    model = load_model(dense)
    am = AnalysisManager(PassContext(config=dict(calib), seed=0))
    start = time.perf_counter()
    result = parse_pipeline(pipeline)(model, am)
    seconds = time.perf_counter() - start
    save_model(result.model, out)
    return result, seconds


def zero_fraction(model, sites_only: bool = True) -> float:
    from optc.ir import annotation, constant_array
    from optc.ir.annotations import SPARSITY

    zeros = total = 0
    for node in model.graph:
        if annotation(node, SPARSITY) is None:
            continue
        array = constant_array(node.inputs[1])
        zeros += int((array == 0).sum())
        total += array.size
    return zeros / total if total else 0.0


def interleaved_latency(paths: list[Path], feeds: list[dict], rounds: int, threads: int) -> list[float]:
    """Median latency of each model on its feed, sessions taking turns (drift hits all alike)."""
    from optc.runtime.ort import open_session

    sessions = [open_session(p, threads=threads) for p in paths]
    times: list[list[float]] = [[] for _ in paths]
    for session, feed in zip(sessions, feeds, strict=True):
        session.run(None, feed)  # warm-up
    for _ in range(rounds):
        for i, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def expected_head_params(model) -> int:
    """Parameters prune-heads{ratio=0.25} should remove, from the geometry of the attention blocks."""
    from optc.passes.attention import find_attention

    total = 0
    for block in find_attention(model):
        group = block.group_size
        d = block.head_dim
        hidden = block.q.in_features
        if group == 1:
            heads = min(int(round(0.25 * block.kv_heads)), block.kv_heads - 1)
            per_head = d * hidden * 4 + d * sum(k in block.biases for k in ("q", "k", "v"))
            total += heads * per_head
        else:
            heads = min(int(round(0.25 * group)), group - 1) * block.kv_heads
            total += heads * d * (hidden + block.o.out_features) + heads * d * ("q" in block.biases)
    return total


# --------------------------------------------------------------------------- plot


def write_plot(path: Path, points: list[tuple[float, float, str]], dense: tuple[float, float]) -> str:
    """Parameters (x) against perplexity (y); matplotlib when installed, else a minimal PNG of the curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [p[0] / 1e6 for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", label="lowrank (whitened SVD)")
        for x, y, label in zip(xs, [p[1] for p in points], [p[2] for p in points], strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([dense[0] / 1e6], [dense[1]], "k*", markersize=10, label="dense")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return "matplotlib"
    except ImportError:
        _minimal_png(path, [(p[0], p[1]) for p in points], dense)
        return "minimal PNG (no matplotlib: x = parameters, y = log perplexity, black star-ish = dense)"


def _minimal_png(path: Path, points: list[tuple[float, float]], dense: tuple[float, float]) -> None:
    width, height, margin = 480, 320, 30
    image = np.full((height, width, 3), 255, np.uint8)
    xs = [p[0] for p in points] + [dense[0]]
    ys = [np.log(p[1]) for p in points] + [np.log(dense[1])]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x: float, y: float) -> tuple[int, int]:
        col = margin + int((x - x0) / (x1 - x0) * (width - 2 * margin))
        row = height - margin - int((y - y0) / (y1 - y0) * (height - 2 * margin))
        return row, col

    image[height - margin, margin:width - margin] = 0
    image[margin:height - margin, margin] = 0
    pixels = sorted(px(x, y) for x, y in zip(xs[:-1], ys[:-1], strict=True))
    pixels.sort(key=lambda rc: rc[1])
    for (r0, c0), (r1, c1) in zip(pixels, pixels[1:], strict=False):
        steps = max(abs(r1 - r0), abs(c1 - c0), 1)
        for t in range(steps + 1):
            image[r0 + (r1 - r0) * t // steps, c0 + (c1 - c0) * t // steps] = (30, 90, 200)
    for r, c in pixels:
        image[max(r - 3, 0):r + 4, max(c - 3, 0):c + 4] = (30, 90, 200)
    r, c = px(xs[-1], ys[-1])
    image[max(r - 4, 0):r + 5, c] = 0
    image[r, max(c - 4, 0):c + 5] = 0
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


# --------------------------------------------------------------------------- BERT


def bert_check(args, work: Path) -> list[str]:
    import torch
    import transformers

    from optc.frontends.transformers import load_transformers
    from optc.ir import save_model

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1024, hidden_size=args.bert_hidden, num_hidden_layers=args.bert_layers,
        num_attention_heads=args.bert_heads, intermediate_size=4 * args.bert_hidden, max_position_embeddings=512,
    )
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random biases and norms: a fresh BERT's zero biases would be merged into shared constants
        for parameter in hf.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    source = work / "bert-hf"
    hf.save_pretrained(source)
    os.environ.setdefault("OPTC_CACHE_DIR", str(work / "cache"))
    model = load_transformers(source)
    dense = work / "bert-dense.onnx"
    save_model(model, dense)
    before = param_count(model)
    expected = expected_head_params(model)
    calib = {"calibration.spec": "random", "calibration.samples": 8, "calibration.seqlen": 128}
    result, seconds = compile_variant(dense, "prune-heads{ratio=0.25}", calib, work / "bert-heads.onnx")
    after = param_count(result.model)
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(0, 1024, size=(1, args.ctx), dtype=np.int64),
        "attention_mask": np.ones((1, args.ctx), np.int64),
        "token_type_ids": np.zeros((1, args.ctx), np.int64),
    }
    names = {v.name for v in model.graph.inputs}
    feed = {k: v for k, v in feed.items() if k in names}
    dense_s, pruned_s = interleaved_latency([dense, work / "bert-heads.onnx"], [feed, feed], args.rounds, args.threads)
    heads = result.statistics.get("heads-removed")
    return [
        f"| BERT-like ({args.bert_layers}x{args.bert_hidden}, {args.bert_heads} heads) prune-heads{{ratio=0.25}} | "
        f"{heads} heads removed | params {before:,} -> {after:,} (-{before - after:,}, expected -{expected:,}: "
        f"{'PASS' if before - after == expected else 'FAIL'}) | runs in ORT | latency {pruned_s * 1e3:.1f} ms vs "
        f"{dense_s * 1e3:.1f} ms = {pruned_s / dense_s:.3f}x |"
    ]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    add_text_options(parser)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: every CPU)")
    parser.add_argument("--energies", default="0.8,0.9,0.95,0.98")
    parser.add_argument("--only", default="sparsify,quant-check,heads,ffn,lowrank,bert",
                        help="comma-separated parts to run (several processes can share the work)")
    parser.add_argument("--patterns", default="2:4,unstructured", help="sparsify patterns to compare")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="sparsify methods to compare")
    parser.add_argument("--bert-hidden", type=int, default=384)
    parser.add_argument("--bert-heads", type=int, default=12)
    parser.add_argument("--bert-layers", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-share-hessians", action="store_true", help="recompute the calibration XᵀX per variant")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))

    from optc.evaluate import default_threads, evaluate
    from optc.frontends import load_input
    from optc.frontends.models import default_model_path
    from optc.ir import save_model
    from optc.passes.transforms.check_sparsity import check_nm_sparsity

    args.threads = args.threads or default_threads()
    if not args.no_share_hessians:
        share_hessians()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="optc-bench-pruning-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = {"calibration.spec": "builtin", "calibration.samples": args.samples, "calibration.seqlen": args.seqlen}

    model = load_input(default_model_path())
    dense = work / "dense.onnx"
    save_model(model, dense)
    dense_params = param_count(model)
    del model

    rows: list[dict] = []

    class Notes(list):
        def append(self, note: str) -> None:
            print(f"note: {note}", flush=True)
            super().append(note)

    notes: list[str] = Notes()

    def score(name: str, pipeline: str, path: Path, result=None, seconds: float | None = None, keep: bool = False) -> dict:
        ev = evaluate(path, ctx=args.ctx, max_tokens=args.max_tokens, threads=args.threads)
        row = {"variant": name, "pipeline": pipeline, "ppl": ev.ppl, "compile_s": seconds,
               "params": param_count(result.model) if result is not None else dense_params,
               "zeros": zero_fraction(result.model) if result is not None else 0.0}
        rows.append(row)
        print(f"{name}: ppl {ev.ppl:.3f}, params {row['params']:,}", flush=True)
        if not keep and path != dense:
            for p in (path, path.with_name(path.name + ".data")):
                p.unlink(missing_ok=True)
        return row

    score("dense", "", dense)
    ppl_dense = rows[0]["ppl"]

    if "sparsify" in only:
        for pattern, method in [(p, m) for p, m in SPARSIFY if p in args.patterns.split(",") and m in args.methods.split(",")]:
            pipeline = f"sparsify{{pattern={pattern} method={method}}}"
            out = work / f"sparse-{pattern.replace(':', 'of')}-{method}.onnx"
            result, seconds = compile_variant(dense, pipeline, calib, out)
            checked, problems = check_nm_sparsity(result.model)
            if pattern == "2:4":
                notes.append(f"{pipeline}: {checked} weights checked 2:4 along K, {len(problems)} violations")
            score(f"{method} {pattern}", pipeline, out, result, seconds)
    if "quant-check" in only:
        pipeline = "sparsify{pattern=2:4 method=sparsegpt},quantize"
        result, seconds = compile_variant(dense, pipeline, calib, work / "sparse-quant.onnx")
        checked, problems = check_nm_sparsity(result.model)
        notes.append(f"{pipeline}: {checked} weights checked 2:4 along K through DequantizeLinear, {len(problems)} violations")
        (work / "sparse-quant.onnx").unlink(missing_ok=True)
        (work / "sparse-quant.onnx.data").unlink(missing_ok=True)
        from optc.ir import annotation
        from optc.ir.annotations import SPARSITY

        untouched = [n.name for n in result.model.graph if n.op_type in ("MatMul", "Gemm") and annotation(n, SPARSITY) is None
                     and n.inputs[1] is not None and n.inputs[1].producer() is None and n.inputs[1].const_value is not None]
        notes.append(f"linear layers left dense by sparsify: {untouched} (the tied lm_head)")

    heads_path = work / "heads.onnx"
    if "heads" in only:
        from optc.ir import load_model

        expected = expected_head_params(load_model(dense))
        pipeline = "prune-heads{ratio=0.25}"
        result, seconds = compile_variant(dense, pipeline, calib, heads_path)
        row = score("prune-heads 0.25", pipeline, heads_path, result, seconds, keep=True)
        removed = dense_params - row["params"]
        ids = np.arange(args.ctx, dtype=np.int64)[None, :] % 1000 + 10
        feed = {"input_ids": ids}
        dense_s, heads_s = interleaved_latency([dense, heads_path], [feed, feed], args.rounds, args.threads)
        row["latency_ratio"] = heads_s / dense_s
        notes.append(
            f"prune-heads{{ratio=0.25}}: {result.statistics.get('heads-removed')} heads removed, params -{removed:,} "
            f"(expected -{expected:,}: {'PASS' if removed == expected else 'FAIL'}), runs in onnxruntime, median latency "
            f"of a {args.ctx}-token window {heads_s * 1e3:.1f} ms vs dense {dense_s * 1e3:.1f} ms = {heads_s / dense_s:.3f}x "
            f"({args.rounds} interleaved rounds, {args.threads} threads)"
        )
    if "ffn" in only:
        pipeline = "prune-ffn{ratio=0.25}"
        result, seconds = compile_variant(dense, pipeline, calib, work / "ffn.onnx")
        score("prune-ffn 0.25", pipeline, work / "ffn.onnx", result, seconds)

    curve = []
    if "lowrank" in only:
        for energy in [float(e) for e in args.energies.split(",") if e]:
            pipeline = f"lowrank{{energy={energy} whiten=true}}"
            out = work / f"lowrank-{energy}.onnx"
            result, seconds = compile_variant(dense, pipeline, calib, out)
            row = score(f"lowrank {energy}", pipeline, out, result, seconds)
            curve.append((row["params"], row["ppl"], f"{energy}"))
        if curve:
            how = write_plot(work / "lowrank.png", curve, (dense_params, ppl_dense))
            notes.append(f"lowrank curve: {work / 'lowrank.png'} ({how})")

    print()
    print("| variant | pipeline | params | params vs dense | zeros in pruned weights | ppl | ppl vs dense | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        compile_s = f"{row['compile_s']:.1f}" if row["compile_s"] is not None else ""
        print(f"| {row['variant']} | `{row['pipeline']}` | {row['params']:,} | {row['params'] / dense_params:.3f} | "
              f"{row['zeros']:.3f} | {row['ppl']:.3f} | {row['ppl'] / ppl_dense:.3f} | {compile_s} |")
    print()
    by_name = {r["variant"]: r["ppl"] for r in rows}
    for pattern in ("2:4", "unstructured"):
        names = [f"{m} {pattern}" for m in ("sparsegpt", "wanda", "magnitude")]
        if all(n in by_name for n in names):
            s, w, m = (by_name[n] for n in names)
            ok = s < w < m
            print(f"- {pattern}: sparsegpt {s:.2f} < wanda {w:.2f} < magnitude {m:.2f}: {'PASS' if ok else 'FAIL'}")
    for note in notes:
        print(f"- {note}")
    if "bert" in only:
        for line in bert_check(args, work):
            print(line)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "notes": notes}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
