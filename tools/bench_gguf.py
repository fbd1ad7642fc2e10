#!/usr/bin/env python3
"""Benchmark: optc's GGUF backend (`kquant` + `--target gguf`) against llama-quantize, on SmolLM2-135M.

Both start from the same float weights: optc's IR of the default model
(SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF by the frontend),
which optc also writes as an F32 GGUF (`source-f32.gguf`, no passes). For every
mix, in this one process:

* `llama-quantize`: `llama_cpp.llama_model_quantize(source-f32.gguf, ..., ftype)`
  (llama.cpp's own quantizer, `--threads` threads, no importance matrix);
* `optc`: `kquant{mix=...}` on the IR, then the GGUF backend (`write_gguf`,
  `--threads` threads) — the file `optc MODEL --passes=kquant{mix=...} -o x.gguf` writes.

Columns: file size, held-out perplexity (`optc.evaluate`: the `eval` split of
the built-in text, which calibration never sees, `--max-tokens` tokens in
windows of `--ctx`, the same token ids for every file), how many tensors got the
same type, the fraction of byte-identical blocks (all tensors of the same type;
and the k-quant tensors alone), and a greedy continuation of "The capital of
France is" from llama.cpp on optc's file.

With importance matrix (`--imatrix-mixes`, default Q4_K_M, Q3_K_M, Q2_K):
`kquant{mix=... imatrix=true}` with `--calib builtin` (the `calib` split,
`--samples` × `--seqlen` tokens); its perplexity gain over llama-quantize
without one is reported, and llama-quantize is also run with optc's matrix
(`llama_model_quantize_params.imatrix`), which must give byte-identical
tensors again.

Timing (`--repeats` interleaved runs, medians): llama-quantize vs optc
(kquant pass + encoding + writing) for Q4_K_M on the same threads.

    python tools/bench_gguf.py                           # everything (about 15 minutes on 2 busy cores)
    python tools/bench_gguf.py --mixes Q4_K_M,Q8_0 --imatrix-mixes Q4_K_M --max-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import add_text_options  # noqa: E402 - the benchmarks' shared helpers (tools/_bench.py)

from tests.backends.ggml_oracle import llama_quantize  # noqa: E402 - llama.cpp's quantizer, shared with the tests

MIXES = ("Q8_0", "Q4_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
PROMPT = "The capital of France is"


ENCODER_TYPES = ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "Q8_0")


def encoder_speed(n_rows: int = 512, n_per_row: int = 4096, chunk_rows: int = 128, seed: int = 0) -> dict[str, dict[str, float]]:
    """CPU and wall seconds per million weights of `quants.quantize`, one thread, on random rows.

    Rows are encoded `chunk_rows` at a time, as the backend's chunks of 512K elements are.
    """
    from gguf import GGMLQuantizationType

    from optc.backends.gguf import quants

    rows = np.random.default_rng(seed).standard_normal((n_rows, n_per_row)).astype(np.float32)
    millions = rows.size / 1e6
    result = {}
    for name in ENCODER_TYPES:
        qtype = GGMLQuantizationType[name]
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, n_rows, chunk_rows):
            quants.quantize(rows[start:start + chunk_rows], qtype)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        result[name] = {"cpu_s_per_mweight": cpu / millions, "wall_s_per_mweight": wall / millions}
        print(f"{name:5s} cpu {cpu / millions:7.3f} s/Mw   wall {wall / millions:7.3f} s/Mw", flush=True)
    return result


def optc_quantize(model, dst: Path, mix: str, threads: int, am=None, imatrix: bool = False) -> float:
    """kquant + the GGUF backend's writer; returns the wall time."""
    from optc.backends.gguf import write_gguf
    from optc.backends.gguf.kquant import KQuant

    start = time.perf_counter()
    KQuant(mix=mix, imatrix=imatrix)(model, am)
    write_gguf(model, dst, show_progress=False, threads=threads)
    return time.perf_counter() - start


def compare_blocks(a: Path, b: Path) -> dict:
    """Tensors of the same type, and byte-identical blocks among them (all, and k-quants alone)."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    same_type = same = total = kq_same = kq_total = 0
    types: dict[str, list[int]] = {}
    for name, x in ta.items():
        y = tb.get(name)
        if y is None or x.tensor_type != y.tensor_type:
            continue
        same_type += 1
        if x.tensor_type.name in ("F32", "F16"):
            continue
        size = GGML_QUANT_SIZES[x.tensor_type][1]
        eq = (np.asarray(x.data).view(np.uint8).reshape(-1, size) == np.asarray(y.data).view(np.uint8).reshape(-1, size)).all(axis=1)
        same += int(eq.sum())
        total += eq.size
        entry = types.setdefault(x.tensor_type.name, [0, 0])
        entry[0] += int(eq.sum())
        entry[1] += eq.size
        if x.tensor_type.name.endswith("_K"):
            kq_same += int(eq.sum())
            kq_total += eq.size
    return {
        "tensors": len(ta), "same_type": same_type, "blocks": total, "identical": same,
        "identical_fraction": same / total if total else float("nan"),
        "kquant_blocks": kq_total, "kquant_identical_fraction": kq_same / kq_total if kq_total else float("nan"),
        "by_type": {k: v[0] / v[1] for k, v in sorted(types.items())},
    }


def tensor_bytes_equal(a: Path, b: Path) -> bool:
    """Every tensor (F32 ones included) has the same type, shape and bytes."""
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in GGUFReader(str(b)).tensors}
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)) for n in ta
    )


def generate(path: Path, threads: int) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        out = llm(PROMPT, max_tokens=10, temperature=0.0, top_k=1)
        return out["choices"][0]["text"].strip().replace("\n", " ")
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--imatrix-mixes", default="Q4_K_M,Q3_K_M,Q2_K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs of Q4_K_M")
    add_text_options(parser, max_tokens=2048)
    parser.add_argument("--workdir", default="/tmp/optc-bench-gguf")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--eval-both", action="store_true",
                        help="score llama-quantize's file even when its tensors are byte-identical to optc's (always done for Q4_K_M)")
    parser.add_argument("--encoders", action="store_true",
                        help="only time the block encoders (CPU and wall seconds per million weights, one thread) and stop")
    args = parser.parse_args(argv)
    if args.encoders:
        speed = encoder_speed()
        if args.json:
            Path(args.json).write_text(json.dumps(speed, indent=2))
        return 0

    from optc.backends.gguf import write_gguf
    from optc.evaluate import evaluate
    from optc.frontends.models import default_model_path
    from optc.frontends.transformers import load_transformers
    from optc.passes.infra.analysis import AnalysisManager
    from optc.passes.infra.context import PassContext
    from optc.runtime.tokenizer import tokenizer_from_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = load_transformers(default_model_path())
    tokenizer = tokenizer_from_model(model)
    source = work / "source-f32.gguf"
    write_gguf(model, source, show_progress=False, threads=args.threads)

    def ppl(path: Path) -> float:
        return evaluate(path, None, args.ctx, args.max_tokens, tokenizer, threads=args.threads).ppl

    results: dict = {"source_ppl": ppl(source), "mixes": {}, "imatrix": {}, "timing": {}}
    print(f"source F32 GGUF: {source.stat().st_size / 2**20:.1f} MiB, ppl {results['source_ppl']:.4f}", flush=True)

    mixes = [m for m in args.mixes.split(",") if m]
    for mix in mixes:
        lq, oc = work / f"llama-quantize-{mix}.gguf", work / f"optc-{mix}.gguf"
        t_lq = llama_quantize(source, lq, mix, threads=args.threads)
        t_oc = optc_quantize(model, oc, mix, args.threads)
        blocks = compare_blocks(lq, oc)
        ppl_optc = ppl(oc)
        identical = blocks["same_type"] == blocks["tensors"] and blocks["identical"] == blocks["blocks"] and tensor_bytes_equal(lq, oc)
        # Byte-identical tensors and the same hyper-parameters compute the same logits: scored once unless asked.
        ppl_llama = ppl(lq) if (mix == "Q4_K_M" or args.eval_both or not identical) else ppl_optc
        row = {
            "size_llama": lq.stat().st_size, "size_optc": oc.stat().st_size, "ppl_llama": ppl_llama, "ppl_optc": ppl_optc,
            "llama_scored": mix == "Q4_K_M" or args.eval_both or not identical, "tensors_identical": identical,
            "blocks": blocks, "generation": generate(oc, args.threads), "time_llama": t_lq, "time_optc": t_oc,
        }
        results["mixes"][mix] = row
        print(f"{mix}: {json.dumps({k: v for k, v in row.items() if k != 'blocks'})} identical={row['blocks']['identical_fraction']:.6f}", flush=True)

    im_mixes = [m for m in args.imatrix_mixes.split(",") if m]
    if im_mixes:
        from optc.backends.gguf import GGUF_IMATRIX, collect_parameters, gguf_tensor_name
        from optc.ir import annotation

        context = PassContext(config={"calibration.spec": "builtin", "calibration.samples": args.samples, "calibration.seqlen": args.seqlen})
        am = AnalysisManager(context)
        for mix in im_mixes:
            oc = work / f"optc-{mix}-imatrix.gguf"
            t_oc = optc_quantize(model, oc, mix, args.threads, am=am, imatrix=True)
            matrix = {}
            for param in collect_parameters(model).values():
                column = annotation(param.value, GGUF_IMATRIX)
                name = gguf_tensor_name(param.name)
                if column is not None and name:
                    matrix[name] = np.asarray(column, dtype=np.float32)
            lq = work / f"llama-quantize-{mix}-optc-imatrix.gguf"
            llama_quantize(source, lq, mix, threads=args.threads, imatrix=matrix)
            if mix in results["mixes"]:
                base_ppl = results["mixes"][mix]["ppl_llama"]
            else:
                llama_quantize(source, work / f"llama-quantize-{mix}.gguf", mix, threads=args.threads)
                base_ppl = ppl(work / f"llama-quantize-{mix}.gguf")
            row = {
                "ppl_llama_no_imatrix": base_ppl, "ppl_optc_imatrix": ppl(oc), "ppl_llama_optc_imatrix": ppl(lq),
                "blocks_vs_llama_same_imatrix": compare_blocks(lq, oc), "time_optc": t_oc, "generation": generate(oc, args.threads),
            }
            row["gain"] = 1 - row["ppl_optc_imatrix"] / row["ppl_llama_no_imatrix"]
            results["imatrix"][mix] = row
            print(f"{mix}+imatrix: {json.dumps({k: v for k, v in row.items() if k != 'blocks_vs_llama_same_imatrix'})} "
                  f"identical={row['blocks_vs_llama_same_imatrix']['identical_fraction']:.6f}", flush=True)

    lq_times, oc_times = [], []
    for i in range(args.repeats):
        lq_times.append(llama_quantize(source, work / "timing-lq.gguf", "Q4_K_M", threads=args.threads))
        oc_times.append(optc_quantize(model, work / "timing-optc.gguf", "Q4_K_M", args.threads))
        print(f"timing run {i + 1}: llama-quantize {lq_times[-1]:.2f}s, optc {oc_times[-1]:.2f}s", flush=True)
    t_lq, t_oc = statistics.median(lq_times), statistics.median(oc_times)
    results["timing"] = {"llama_quantize_s": t_lq, "optc_s": t_oc, "ratio": t_oc / t_lq, "runs_llama": lq_times, "runs_optc": oc_times}

    print()
    print(f"source: optc's F32 GGUF of SmolLM2-135M-Instruct, ppl {results['source_ppl']:.4f} "
          f"(held-out eval split, {args.max_tokens} tokens, ctx {args.ctx}); threads {args.threads}")
    print()
    print("| mix | size llama-quantize | size optc | ppl llama-quantize | ppl optc | Δppl | same type | identical blocks | identical k-quant blocks | optc generates |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mix, row in results["mixes"].items():
        b = row["blocks"]
        kq = "—" if not b["kquant_blocks"] else f"{b['kquant_identical_fraction']:.6f}"
        star = "" if row["llama_scored"] else "*"
        print(f"| {mix} | {row['size_llama'] / 2**20:.2f} MiB | {row['size_optc'] / 2**20:.2f} MiB | {row['ppl_llama']:.4f}{star} | {row['ppl_optc']:.4f} | "
              f"{(row['ppl_optc'] / row['ppl_llama'] - 1) * 100:+.3f}% | {b['same_type']}/{b['tensors']} | {b['identical_fraction']:.6f} | {kq} | {row['generation'][:48]} |")
    if any(not row["llama_scored"] for row in results["mixes"].values()):
        print("\n\\* tensors byte-identical to optc's (same types, same bytes, same hyper-parameters): the same logits, scored once")
    if results["imatrix"]:
        print()
        print("| mix | ppl llama-quantize (no imatrix) | ppl optc + imatrix | gain | ppl llama-quantize + optc's imatrix | identical blocks (same imatrix) | optc generates |")
        print("|---|---|---|---|---|---|---|")
        for mix, row in results["imatrix"].items():
            b = row["blocks_vs_llama_same_imatrix"]
            print(f"| {mix} | {row['ppl_llama_no_imatrix']:.4f} | {row['ppl_optc_imatrix']:.4f} | {row['gain'] * 100:.2f}% | "
                  f"{row['ppl_llama_optc_imatrix']:.4f} | {b['identical_fraction']:.6f} | {row['generation'][:48]} |")
    t = results["timing"]
    print()
    print(f"Q4_K_M quantize time (median of {args.repeats}, interleaved, {args.threads} threads): llama-quantize {t['llama_quantize_s']:.2f}s, "
          f"optc {t['optc_s']:.2f}s, ratio {t['ratio']:.2f}x (target <= 5x)")
    print()
    q = results["mixes"]
    targets = []
    for mix in ("Q8_0", "Q4_0"):
        if mix in q:
            targets.append((f"{mix} byte-identical to llama-quantize", q[mix]["blocks"]["identical_fraction"] == 1.0 and q[mix]["blocks"]["same_type"] == q[mix]["blocks"]["tensors"]))
    if "Q4_K_M" in q:
        targets.append(("Q4_K_M ppl within 0.5% of llama-quantize", abs(q["Q4_K_M"]["ppl_optc"] / q["Q4_K_M"]["ppl_llama"] - 1) <= 0.005))
    if "Q4_K_M" in results["imatrix"]:
        targets.append(("Q4_K_M + optc imatrix below llama-quantize Q4_K_M", results["imatrix"]["Q4_K_M"]["gain"] > 0))
    targets.append(("Q4_K_M quantize time <= 5x llama-quantize", t["ratio"] <= 5.0))
    for label, ok in targets:
        print(f"- {label}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
