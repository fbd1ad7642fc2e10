"""Helpers for the per-pass tests: tiny models in text or random, running passes, comparing outputs.

    from tests.passes import builders as b

    model = b.text_model('g (float[2] x) => (float[2] y) { a = Neg(x)  y = Abs(a) }')
    result = b.run(model, "dce")                  # VerifyEach + verify + onnx.checker
    b.assert_same_outputs(before, result.model)   # onnxruntime on random inputs

`tests/fixtures/models.py` holds the shared model zoo; this file only what pass tests add.
"""

from __future__ import annotations

import numpy as np
import onnx

from optc.ir import Model, check_onnx, parse_text, to_proto, verify
from optc.passes import AnalysisManager, PassContext, PassResult, VerifyEach, parse_pipeline
from tests.fixtures import models

HEADER = '<ir_version: 10, opset_import: ["" : 21]>\n'

_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


def text_model(graph_text: str) -> Model:
    """A model from a graph in ONNX textual syntax (opset 21 header added)."""
    return parse_text(HEADER + graph_text)


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
    initializers = {t.name for t in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in tensor_type.shape.dim]
        dtype = _NP[tensor_type.elem_type]
        if dtype is np.bool_:
            data = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            data = rng.integers(0, 4, shape)
        else:
            data = rng.standard_normal(shape)
        feeds[value.name] = np.asarray(data, dtype=dtype)
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


_UNARY = ("Relu", "Neg", "Abs", "Tanh", "Sigmoid")
_BINARY = ("Add", "Mul", "Sub", "Max")


def random_dag(
    seed: int,
    *,
    nodes: int = 12,
    duplicate_rate: float = 0.3,
    constant_rate: float = 0.3,
    dead_rate: float = 0.2,
    width: int = 4,
) -> Model:
    """A random elementwise DAG over x:[2,width] with duplicated, constant and dead parts.

    Each node draws its op and operands from the values so far (the input, earlier
    results, small initializers); with `duplicate_rate` it repeats an earlier node
    verbatim, with `constant_rate` it computes only from initializers, and
    results that are not summed into the output `y0` are dead unless a later node reads
    them; `y1` is x times the first summed result.
    """
    rng = np.random.default_rng(seed)
    inits = {f"c{i}": rng.standard_normal(width).round(2) for i in range(3)}
    inits["c3"] = inits["c0"].copy()  # a duplicate initializer
    lines: list[str] = []
    values = ["x"]
    constants = list(inits)
    made: list[tuple[str, tuple[str, ...]]] = []
    for i in range(nodes):
        name = f"v{i}"
        if made and rng.random() < duplicate_rate:
            op, args = made[int(rng.integers(len(made)))]
        else:
            pool = constants if rng.random() < constant_rate else values + constants
            op = str(rng.choice(_UNARY + _BINARY))
            arity = 1 if op in _UNARY else 2
            args = tuple(str(rng.choice(pool)) for _ in range(arity))
        made.append((op, args))
        lines.append(f"  {name} = {op}({', '.join(args)})")
        (constants if all(a in constants for a in args) else values).append(name)
    live = [v for v in values[1:] if rng.random() > dead_rate] or [values[-1]]
    total = "x"
    for i, value in enumerate(live[:-1]):
        lines.append(f"  sum{i} = Add({total}, {value})")
        total = f"sum{i}"
    lines.append(f"  y0 = Add({total}, {live[-1]})")
    lines.append(f"  y1 = Mul(x, {live[0]})")
    decls = ", ".join(f"float[{width}] {n} = {{{', '.join(str(float(v)) for v in a)}}}" for n, a in inits.items())
    body = "\n".join(lines)
    return text_model(f"g (float[2,{width}] x) => (float[2,{width}] y0, float[2,{width}] y1) <{decls}>\n{{\n{body}\n}}\n")


def messy_model() -> Model:
    """The acceptance model: dead, duplicated and constant subgraphs around a small MLP.

    * dead: `dead_a`/`dead_b` (a chain) and the initializer `unused`;
    * duplicated: `h2` repeats `h1`, `s2` repeats `s1`;
    * constant: `scale` = (c1 + c2) * c3, a Constant node, and `Shape` of a static input.
    """
    return text_model(
        """
g (float[2,4] x) => (float[2,4] y, float[2,4] z)
  <float[4,4] w = {0.5, -1, 0.25, 2, 1, 0.5, -0.5, 0, -2, 1, 1, 0.75, 0, 0.5, -1, 1.5},
   float[4] b = {0.1, -0.2, 0.3, -0.4},
   float[4] c1 = {1, 2, 3, 4}, float[4] c2 = {0.5, 0.5, 0.5, 0.5}, float[4] c3 = {2, 2, 2, 2},
   float[3,3] unused = {1, 2, 3, 4, 5, 6, 7, 8, 9}>
{
  k = Constant<value_floats=[1.0, -1.0, 1.0, -1.0]>()
  c12 = Add(c1, c2)
  scale = Mul(c12, c3)
  shape = Shape(x)
  h1 = MatMul(x, w)
  h2 = MatMul(x, w)
  r1 = Add(h1, b)
  r2 = Add(h2, b)
  s1 = Relu(r1)
  s2 = Relu(r2)
  t = Mul(s1, scale)
  u = Add(t, k)
  dead_a = Sigmoid(u)
  dead_b = Tanh(dead_a)
  flat = Reshape(u, shape)
  y = Add(flat, s2)
  z = Sub(s1, s2)
}
"""
    )
