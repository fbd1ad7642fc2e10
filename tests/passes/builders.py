"""Helpers for the per-pass tests: running passes, comparing outputs.

    from tests.fixtures import text_models as tm
    from tests.passes import builders as b

    model = tm.text_model('g (float[2] x) => (float[2] y) { a = Neg(x)  y = Abs(a) }')
    result = b.run(model, "dce")                  # VerifyEach + verify + onnx.checker
    b.assert_same_outputs(before, result.model)   # onnxruntime on random inputs

The models themselves are built in `tests/fixtures/`.
"""

from __future__ import annotations

import numpy as np
import onnx

from optc.ir import Model, check_onnx, to_proto, verify
from optc.passes import AnalysisManager, PassContext, PassResult, VerifyEach, parse_pipeline
from tests.fixtures import models


def run(model: Model, pipeline: str) -> PassResult:
    """Run a pipeline as the CLI does with --verify-each, then verify and run onnx.checker."""
    am = AnalysisManager(PassContext(instruments=[VerifyEach()]))
    result = parse_pipeline(pipeline)(model, am)
    verify(result.model, where=f"after {pipeline!r}")
    check_onnx(result.model)
    return result


def snapshot(model: Model) -> onnx.ModelProto:
    """A serialized copy to run or compare after a pass changed the model in place."""
    return to_proto(model)


def random_feeds(model: Model | onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer (symbolic dims are 3)."""
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in models.free_inputs(proto, symbolic_dim=3):
        if dtype is np.bool_:
            data = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            data = rng.integers(0, 4, shape)
        else:
            data = rng.standard_normal(shape)
        feeds[name] = np.asarray(data, dtype=dtype)
    return feeds


def assert_same_outputs(
    before: onnx.ModelProto | Model,
    after: onnx.ModelProto | Model,
    *,
    seeds: tuple[int, ...] = (0, 1),
    atol: float = 0.0,
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
    """onnxruntime gives the same outputs (same names, dtypes, shapes, values) before and after."""
    before_proto = before if isinstance(before, onnx.ModelProto) else to_proto(before)
    after_proto = after if isinstance(after, onnx.ModelProto) else to_proto(after)
    assert [o.name for o in before_proto.graph.output] == [o.name for o in after_proto.graph.output]
    for seed in seeds if feeds is None else (None,):
        inputs = feeds if feeds is not None else random_feeds(before_proto, seed)
        expected = models.run_ort(before_proto, inputs)
        actual = models.run_ort(after_proto, inputs)
        for name, want, got in zip((o.name for o in before_proto.graph.output), expected, actual, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, f"output {name}"
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"output {name}")
