"""Tiny random ONNX models for tests, built with `onnx.helper`.

Every builder returns an `onnx.ModelProto` (opset `DEFAULT_OPSET`, checked
with `onnx.checker`) whose weights come from a seeded generator, so the same
call always builds byte-identical models. Convert to optc's IR with
`to_ir(proto)`; run with onnxruntime through `run_ort(proto_or_path, feeds)`;
make matching inputs with `random_inputs(proto)`.

    from tests import models

    proto = models.mlp()
    model = models.to_ir(proto)
    feeds = models.random_inputs(proto)
    expected = models.run_ort(proto, feeds)

Builders (all keyword arguments optional):

* `mlp(seed, batch, features, hidden, outputs)` – X → MatMul → Add → Relu → MatMul → Add → Y.
* `dead_nodes(seed)` – the MLP plus a dead branch (two nodes) and an unused initializer.
* `duplicated_subgraph(seed)` – two identical MatMul → Relu branches of X summed.
* `constant_subgraph(seed)` – (C1 + C2) * C3 computed from initializers only, then added to X.
* `if_model(seed)` – an `If` whose branches read outer-scope values.
* `loop_model(seed)` – a `Loop` that adds an outer-scope weight to a carried value N times.

Value names are stable (`X`, `Y`, `W1`, ...) so tests may look them up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optc.ir import DEFAULT_IR_VERSION, DEFAULT_OPSET, Model, from_proto

FLOAT = TensorProto.FLOAT

#: Names of the model builders, for parametrizing tests over every model.
BUILDERS = ("mlp", "dead_nodes", "duplicated_subgraph", "constant_subgraph", "if_model", "loop_model")

__all__ = [
    "BUILDERS",
    "constant_subgraph",
    "dead_nodes",
    "duplicated_subgraph",
    "if_model",
    "loop_model",
    "make_model",
    "mlp",
    "random_inputs",
    "run_ort",
    "to_ir",
    "weight",
]


def weight(name: str, shape: Sequence[int], rng: np.random.Generator, dtype=np.float32) -> TensorProto:
    """A random initializer (standard normal, cast to `dtype`)."""
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[TensorProto] = (),
    *,
    name: str = "test",
    check: bool = True,
) -> onnx.ModelProto:
    """Wrap nodes into a model with optc's default opset and IR version."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)], ir_version=DEFAULT_IR_VERSION
    )
    model.producer_name = "optc-tests"
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _io(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, list(shape))


def mlp(
    seed: int = 0, *, batch: int = 2, features: int = 8, hidden: int = 16, outputs: int = 4
) -> onnx.ModelProto:
    """Two-layer perceptron: Y = Relu(X @ W1 + B1) @ W2 + B2."""
    rng = np.random.default_rng(seed)
    inits = [
        weight("W1", (features, hidden), rng),
        weight("B1", (hidden,), rng),
        weight("W2", (hidden, outputs), rng),
        weight("B2", (outputs,), rng),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "B1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="mm2"),
        helper.make_node("Add", ["h3", "B2"], ["Y"], name="add2"),
    ]
    return make_model(nodes, [_io("X", (batch, features))], [_io("Y", (batch, outputs))], inits, name="mlp")


def dead_nodes(seed: int = 0) -> onnx.ModelProto:
    """The MLP plus nodes `dead1`/`dead2` whose results nothing reads, and an unused initializer `Unused`.

    `dead2` consumes `dead1`, so removing them needs a backwards sweep.
    """
    base = mlp(seed)
    rng = np.random.default_rng(seed + 1)
    graph = base.graph
    graph.initializer.append(weight("Unused", (3, 3), rng))
    graph.initializer.append(weight("DeadScale", (8,), rng))
    graph.node.extend(
        [
            helper.make_node("Mul", ["X", "DeadScale"], ["d0"], name="dead1"),
            helper.make_node("Sigmoid", ["d0"], ["d1"], name="dead2"),
        ]
    )
    onnx.checker.check_model(base, full_check=True)
    return base


def duplicated_subgraph(seed: int = 0, *, batch: int = 2, features: int = 8) -> onnx.ModelProto:
    """Y = Relu(X @ W) + Relu(X @ W): two identical branches `a`/`b` that CSE can merge."""
    rng = np.random.default_rng(seed)
    inits = [weight("W", (features, features), rng)]
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["a0"], name="mm_a"),
        helper.make_node("Relu", ["a0"], ["a1"], name="relu_a"),
        helper.make_node("MatMul", ["X", "W"], ["b0"], name="mm_b"),
        helper.make_node("Relu", ["b0"], ["b1"], name="relu_b"),
        helper.make_node("Add", ["a1", "b1"], ["Y"], name="sum"),
    ]
    shape = (batch, features)
    return make_model(nodes, [_io("X", shape)], [_io("Y", shape)], inits, name="duplicated")


def constant_subgraph(seed: int = 0, *, batch: int = 2, features: int = 8) -> onnx.ModelProto:
    """Y = X + (C1 + C2) * C3 where C1..C3 are initializers, so `c_add`/`c_mul` fold to a constant.

    Also holds a `Constant` node (`c_node`, output `K`) feeding `c_add2`.
    """
    rng = np.random.default_rng(seed)
    inits = [weight(n, (features,), rng) for n in ("C1", "C2", "C3")]
    k = numpy_helper.from_array(np.full((features,), 0.5, dtype=np.float32), "K_value")
    nodes = [
        helper.make_node("Constant", [], ["K"], name="c_node", value=k),
        helper.make_node("Add", ["C1", "C2"], ["c0"], name="c_add"),
        helper.make_node("Mul", ["c0", "C3"], ["c1"], name="c_mul"),
        helper.make_node("Add", ["c1", "K"], ["c2"], name="c_add2"),
        helper.make_node("Add", ["X", "c2"], ["Y"], name="out"),
    ]
    shape = (batch, features)
    return make_model(nodes, [_io("X", shape)], [_io("Y", shape)], inits, name="constants")


def if_model(seed: int = 0, *, features: int = 4) -> onnx.ModelProto:
    """Y = If(cond, then: X @ W + B, else: X - B); branches read `X`, `W` and `B` from the outer scope."""
    rng = np.random.default_rng(seed)
    inits = [weight("W", (features, features), rng), weight("B", (features,), rng)]
    then_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["t0"], name="then_mm"),
            helper.make_node("Add", ["t0", "B"], ["t1"], name="then_add"),
        ],
        "then_branch",
        [],
        [_io("t1", (1, features))],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["X", "B"], ["e0"], name="else_sub")],
        "else_branch",
        [],
        [_io("e0", (1, features))],
    )
    nodes = [
        helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=then_graph, else_branch=else_graph)
    ]
    inputs = [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), _io("X", (1, features))]
    return make_model(nodes, inputs, [_io("Y", (1, features))], inits, name="if")


def loop_model(seed: int = 0, *, features: int = 4) -> onnx.ModelProto:
    """Y = X + N * W computed by a `Loop` of `N` iterations whose body reads `W` from the outer scope."""
    rng = np.random.default_rng(seed)
    inits = [weight("W", (features,), rng)]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            helper.make_node("Add", ["acc_in", "W"], ["acc_out"], name="body_add"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _io("acc_in", (features,)),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _io("acc_out", (features,))],
    )
    nodes = [helper.make_node("Loop", ["N", "", "X"], ["Y"], name="loop", body=body)]
    inputs = [helper.make_tensor_value_info("N", TensorProto.INT64, []), _io("X", (features,))]
    return make_model(nodes, inputs, [_io("Y", (features,))], inits, name="loop")


def to_ir(proto: onnx.ModelProto) -> Model:
    """A fresh optc IR model from a proto (the proto is not modified)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return from_proto(copy)


_NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.BOOL: np.bool_, TensorProto.INT64: np.int64}


def random_inputs(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input that is not an initializer.

    Floats are standard normal; bools are True; int64 scalars are 3 (a loop count).
    Symbolic dimensions become 1.
    """
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in proto.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in proto.graph.input:
        if value.name in init_names:
            continue
        ttype = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in ttype.shape.dim]
        np_type = _NP_TYPES[ttype.elem_type]
        if np_type is np.float32:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
        elif np_type is np.bool_:
            feeds[value.name] = np.ones(shape, dtype=np.bool_)
        else:
            feeds[value.name] = np.full(shape, 3, dtype=np_type)
    return feeds


def run_ort(
    model: onnx.ModelProto | Model | str | os.PathLike, feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """Run with onnxruntime on CPU (graph optimizations off) and return all outputs."""
    import onnxruntime as ort

    if isinstance(model, Model):
        from optc.ir import to_proto

        model = to_proto(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
