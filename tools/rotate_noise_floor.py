#!/usr/bin/env python3
"""How far float32-rounding-sized weight noise alone moves the unrotated SmolLM2's logits, computed in float64.

Every float initializer of more than 4096 entries is multiplied by 1 + u·2⁻²⁴ (u uniform in [−1, 1], seeded:
at most half a float32 ulp, no more than rounding a rewritten weight to float32 costs), the model runs in
float64 (tests/fixtures/models.py::as_float64) on the slow rotate test's 128 random token ids (seed 0), and the
largest |difference| of the logits from the unperturbed float64 model is printed per noise seed, with its
position. A position whose logits move far more than the median position's under such noise is ill-conditioned:
no rewrite that rounds its weights to float32 (`rotate` must) can be guaranteed within a fixed line there.
About 2 minutes on one core.

    python tools/rotate_noise_floor.py --seeds 3
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


def logits(proto, ids: np.ndarray) -> np.ndarray:
    """The model's logits for `ids`, onnxruntime on CPU, 1 thread, graph optimizations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="noise draws")
    args = parser.parse_args()

    import onnx
    from onnx import numpy_helper

    from optc.frontends import load_input
    from optc.frontends.models import default_model_path
    from optc.ir import save_model
    from tests.fixtures.models import as_float64

    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 128), dtype=np.int64)
    with tempfile.TemporaryDirectory() as folder:
        save_model(load_input(default_model_path()), Path(folder) / "orig32.onnx")
        as_float64(Path(folder) / "orig32.onnx", Path(folder) / "orig64.onnx")
        base = onnx.load(str(Path(folder) / "orig64.onnx"), load_external_data=True)
    reference = logits(base, ids)
    print("| noise seed | largest (position) | second | third | median position |")
    print("|---|---|---|---|---|")
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        noisy = onnx.ModelProto()
        noisy.CopyFrom(base)
        for t in noisy.graph.initializer:
            array = numpy_helper.to_array(t)
            if array.dtype == np.float64 and array.size > 4096:
                array = array * (1.0 + rng.uniform(-1.0, 1.0, array.shape) * 2.0**-24)
                t.CopyFrom(numpy_helper.from_array(array, t.name))
        per_position = np.abs(logits(noisy, ids) - reference).max(axis=-1)
        top = np.argsort(per_position)[::-1][:3]
        cells = [f"{per_position[i]:.3g} ({i})" for i in top]
        print(f"| {seed} | " + " | ".join(cells) + f" | {np.median(per_position):.2g} |", flush=True)


if __name__ == "__main__":
    main()
