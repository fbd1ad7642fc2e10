#!/usr/bin/env python3
"""How far `rotate` moves SmolLM2's logits, beside the float32 rounding floor of the unrotated model.

The harness of tests/passes/test_rotate.py::test_rotate_keeps_smollm2_logits: the default model from
`load_input`, `rotate{OPTIONS}` with `PassContext()` (no calibration), 128 random token ids (seed 0) and
the first 1024 tokens of the built-in texts topics, code and docstrings. float64 means the model widened
by tests/fixtures/models.py::as_float64. onnxruntime on CPU, 1 thread, graph optimizations off; with
`--optimized` also float32 at onnxruntime's default level (what users run). Each cell is the largest
absolute difference over all positions and vocabulary entries, its position, and the next position's largest:

* orig32 - orig64: the unrotated model's own float32 rounding (the floor any reordering of the arithmetic meets)
* rot32 - orig64: the rotated model in float32 against the exact logits
* rot64 - orig64: what the rotation changes, float32 rounding aside
* rot32 - orig32: the figure issue 19 bounds (1e-4)

About 5 minutes on one core (float64 runs on 1024 tokens included); the numbers do not depend on the load.

    python tools/rotate_exactness.py                       # default options
    python tools/rotate_exactness.py --options '{online=true}' --optimized
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXTS = ("topics", "code", "docstrings")


def feeds(model) -> dict[str, np.ndarray]:
    """The slow test's inputs: 128 random ids, then 1024 tokens of each built-in text."""
    from optc.evaluate import tokenize
    from optc.runtime.text import named_text
    from optc.runtime.tokenizer import tokenizer_from_model

    tokenizer = tokenizer_from_model(model)
    out = {"random": np.random.default_rng(0).integers(0, 49152, size=(1, 128), dtype=np.int64)}
    for name in TEXTS:
        out[name] = np.asarray(tokenize(tokenizer, named_text(name)), dtype=np.int64).reshape(1, -1)[:, :1024]
    return out


def session(path: Path, optimized: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--options", default="", help="rotate's options, e.g. '{online=true}'")
    parser.add_argument("--optimized", action="store_true", help="also float32 with onnxruntime's default optimizations")
    args = parser.parse_args()

    from optc.frontends import load_input
    from optc.frontends.models import default_model_path
    from optc.ir import save_model
    from optc.passes import AnalysisManager, PassContext, parse_pipeline
    from tests.fixtures.models import as_float64

    model = load_input(default_model_path())
    inputs = feeds(model)
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: Path(folder) / f"{name}.onnx" for name in ("orig32", "rot32", "orig64", "rot64")}
        save_model(model, paths["orig32"])
        context = PassContext()
        result = parse_pipeline(f"rotate{args.options}")(model, AnalysisManager(context))
        for remark in context.remarks:
            if remark.pass_name == "rotate":
                print(f"# rotate{args.options}: {remark.kind}: {remark.message}", file=sys.stderr)
        save_model(result.model, paths["rot32"])
        del model, result
        as_float64(paths["orig32"], paths["orig64"])
        as_float64(paths["rot32"], paths["rot64"])

        runs = [(name, name, False) for name in paths]
        if args.optimized:
            runs += [("orig32-opt", "orig32", True), ("rot32-opt", "rot32", True)]
        pairs = [("orig32", "orig64"), ("rot32", "orig64"), ("rot64", "orig64"), ("rot32", "orig32")]
        if args.optimized:
            pairs += [("orig32-opt", "orig64"), ("rot32-opt", "orig64"), ("rot32-opt", "orig32-opt")]
        table = {pair: {} for pair in pairs}
        for text, ids in inputs.items():
            logits = {}
            for label, name, optimized in runs:
                logits[label] = session(paths[name], optimized).run(None, {"input_ids": ids})[0].astype(np.float64)
            for a, b in pairs:
                per_position = np.abs(logits[a] - logits[b]).max(axis=-1).reshape(-1)
                first, second = np.argsort(per_position)[::-1][:2]
                table[a, b][text] = (per_position[first], int(first), per_position[second])
            print(f"# {text} ({ids.shape[1]} tokens) done", file=sys.stderr, flush=True)
            del logits

    columns = ["random", *TEXTS]
    print(f"rotate{args.options}: max |difference| of logits (its position; the next position's)")
    print("| difference | " + " | ".join(f"{c} {inputs[c].shape[1]}" for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for a, b in pairs:
        cells = [f"{top:.3g} ({at}; next {nxt:.3g})" for top, at, nxt in (table[a, b][c] for c in columns)]
        print(f"| {a} - {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
