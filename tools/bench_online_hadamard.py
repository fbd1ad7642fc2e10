#!/usr/bin/env python3
"""Benchmark: the online Hadamard before a down projection in onnxruntime, as one constant MatMul or as rotate's
Kronecker-factored subgraph (Reshape, MatMul by B, MatMul by Aᵀ, Reshape), on SmolLM2's FFN width.

Both compute x·(A⊗B) for x of shape [1, tokens, width]; the table gives the median time of each
(interleaved rounds, same session options) and the constant bytes each form stores.

    python tools/bench_online_hadamard.py                      # width 1536 (SmolLM2), 256 tokens
    python tools/bench_online_hadamard.py --width 4096 --tokens 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build(width: int, form: str, path: Path) -> int:
    """Write the one-op (or Kronecker) model; returns the bytes of its constants."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from optc.passes.transforms.rotate import hadamard, hadamard_factors

    orders = hadamard_factors(width)
    a = orders[0] if len(orders) > 1 and orders[0] & (orders[0] - 1) else 1
    b = width // a
    big_a = hadamard(a) if a > 1 else np.ones((1, 1))
    big_b = hadamard(b)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "tokens", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "tokens", width])
    if form == "matmul":
        full = numpy_helper.from_array(np.kron(big_a, big_b).astype(np.float32), "R")
        nodes, inits = [helper.make_node("MatMul", ["x", "R"], ["y"])], [full]
    else:
        inits = [numpy_helper.from_array(np.array([0, 0, a, b], np.int64), "split"),
                 numpy_helper.from_array(np.array([0, 0, width], np.int64), "merge"),
                 numpy_helper.from_array(big_b.astype(np.float32), "B"),
                 numpy_helper.from_array(big_a.T.astype(np.float32), "At")]
        nodes = [helper.make_node("Reshape", ["x", "split"], ["x4"]), helper.make_node("MatMul", ["x4", "B"], ["xb"]),
                 helper.make_node("MatMul", ["At", "xb"], ["axb"]), helper.make_node("Reshape", ["axb", "merge"], ["y"])]
    graph = helper.make_graph(nodes, form, [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return sum(numpy_helper.to_array(t).nbytes for t in inits)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((1, args.tokens, args.width)).astype(np.float32)
    sessions, sizes, outputs = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for form in ("matmul", "kronecker"):
            path = Path(folder) / f"{form}.onnx"
            sizes[form] = build(args.width, form, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            sessions[form] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            outputs[form] = sessions[form].run(None, {"x": x})[0]
    times: dict[str, list[float]] = {form: [] for form in sessions}
    for _ in range(args.rounds):
        for form, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"x": x})
            times[form].append(time.perf_counter() - start)
    base = statistics.median(times["matmul"])
    print(f"online Hadamard, width {args.width}, {args.tokens} tokens, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds; outputs differ by {np.abs(outputs['matmul'] - outputs['kronecker']).max():.1e}\n")
    print("| form | median | / matmul | constants |")
    print("|---|---|---|---|")
    for form in sessions:
        median = statistics.median(times[form])
        print(f"| {form} | {median * 1e3:.3f} ms | {median / base:.2f}× | {sizes[form] / 1e6:.3f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
