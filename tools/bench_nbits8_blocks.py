#!/usr/bin/env python3
"""Benchmark: one 8-bit `com.microsoft::MatMulNBits` at accuracy level 4 by block size (`lower-ort-nbits{bits8-block}`).

Accuracy level 4 quantizes the activations to int8 per block of the weight's
`block_size` on every run, so the block decides how far the product is from
float activations as much as the weight's own rounding does. For each block
size the weight is the same (int8 codes with one scale per 128 input channels,
repeated over the smaller blocks, as `lower-ort-nbits` writes them), so the
table isolates the activation blocks:

* `error gauss` / `error heavy`: relative RMS error of the product against the
  same weights with float64 activations, for standard normal activations and
  for heavy-tailed ones (the product of two normals, like a SwiGLU's output);
* `1 token` / `N tokens`: median latency over interleaved rounds (every block
  size once per round, in rotating order), and its ratio to block 128 in the
  same run;
* `bytes/weight`: codes and fp32 scales.

    python tools/bench_nbits8_blocks.py                       # 4096 -> 11008 (a Llama-2-7B MLP projection)
    python tools/bench_nbits8_blocks.py --k 576 --n 1536 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np

BLOCKS = (128, 64, 32, 16)


def session(codes: np.ndarray, scales: np.ndarray, k: int, n: int, block: int, level: int, threads: int):
    """An onnxruntime session of one MatMulNBits(bits=8) over `codes` [N, K] (signed) and `scales` [N, K/128]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    repeat = 128 // block
    blocks = -(-k // block)
    padded = np.full((n, blocks * block), 128, dtype=np.uint8)
    padded[:, :k] = (codes.astype(np.int16) + 128).astype(np.uint8)
    block_scales = np.repeat(scales, repeat, axis=1)[:, :blocks]
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph(
        [node], "nbits8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(padded.reshape(n, blocks, block), "w"),
         numpy_helper.from_array(np.ascontiguousarray(block_scales).reshape(-1), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relative_error(sess, x: np.ndarray, weight: np.ndarray) -> float:
    want = x.astype(np.float64) @ weight
    got = sess.run(None, {"x": x})[0]
    return float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4096, help="input channels")
    parser.add_argument("--n", type=int, default=11008, help="output channels")
    parser.add_argument("--tokens", type=int, default=16, help="rows of the second timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    k, n = args.k, args.n
    rng = np.random.default_rng(args.seed)
    groups = -(-k // 128)
    w = rng.standard_normal((n, groups * 128)).astype(np.float32) * 0.02
    scales = np.abs(w.reshape(n, groups, 128)).max(axis=2) / 127.0
    codes = np.clip(np.rint(w.reshape(n, groups, 128) / scales[:, :, None]), -127, 127).astype(np.int8)
    codes = codes.reshape(n, groups * 128)[:, :k]
    weight = (codes.astype(np.float64) * np.repeat(scales, 128, axis=1)[:, :k]).T  # [K, N]
    sessions = {b: session(codes, scales, k, n, b, 4, args.threads) for b in BLOCKS}
    gauss = rng.standard_normal((16, k)).astype(np.float32)
    heavy = (rng.standard_normal((16, k)) * rng.standard_normal((16, k))).astype(np.float32)
    inputs = {1: gauss[:1], args.tokens: rng.standard_normal((args.tokens, k)).astype(np.float32)}
    times: dict[tuple[int, int], list[float]] = {(b, t): [] for b in BLOCKS for t in inputs}
    for sess in sessions.values():
        for x in inputs.values():
            sess.run(None, {"x": x})
    order = list(BLOCKS)
    for r in range(args.rounds):
        for b in order[r % len(order):] + order[:r % len(order)]:
            for t, x in inputs.items():
                start = time.perf_counter()
                for _ in range(5):
                    sessions[b].run(None, {"x": x})
                times[(b, t)].append((time.perf_counter() - start) / 5)
    median = {key: float(np.median(v)) * 1e3 for key, v in times.items()}
    print(f"one MatMulNBits(bits=8, accuracy_level=4) {k} -> {n}, the same int8 weights (scale per 128), "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds")
    print(f"| block | error gauss | error heavy | 1 token | {args.tokens} tokens | bytes/weight |")
    print("|---|---|---|---|---|---|")
    for b, sess in sessions.items():
        cells = [f"{median[(b, t)]:.2f} ms ({median[(b, t)] / median[(128, t)]:.2f}×)" for t in inputs]
        print(f"| {b} | {relative_error(sess, gauss, weight):.2e} | {relative_error(sess, heavy, weight):.2e} | "
              f"{' | '.join(cells)} | {1 + 4 / b:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
