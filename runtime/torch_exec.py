"""Run optc's IR in PyTorch: an interpreter over the graph's ONNX ops, differentiable in the float weights.

`TorchExecutor(model)` is a `torch.nn.Module`. It turns every initializer into a
tensor once (the trainable float weights into `nn.Parameter`s, everything
else into buffers), orders the graph's nodes into a list of steps, and on each
call runs them with PyTorch ops that follow ONNX semantics, freeing every
intermediate value after its last reader. Gradients flow back to the
parameters, so a pass can fine-tune the IR's weights (`distill`) and write
them back with `write_back`. It runs on CPU or CUDA (`.to(device)`).

    executor = TorchExecutor(model)                      # trainable: the model's float weights
    logits, = executor({"input_ids": ids})               # torch tensors, differentiable
    executor.run(feed, ["logits", "some_activation"])    # numpy, no grad: ModelRunner's interface

Covered: the ops of the exported LLaMA-family decoders (SmolLM2), of BERT-like
encoders and small CNNs (`SUPPORTED_OPS`), including `QuantizeLinear` /
`DequantizeLinear` (per tensor, per axis and blocked; int8/uint8/int16/uint16/
int4/uint4/FP8), so quantized graphs run too. Rounding in `QuantizeLinear` has
no gradient: weights upstream of an activation Q/DQ pair are not trained
through it (distill before quantizing). Any other op, a subgraph (`If`,
`Loop`) or a non-default domain stops with one line naming it.

Outputs match onnxruntime's (CPU, fp32) within 1e-4 on SmolLM2 and on the
tests' BERT-like and LLaMA-like blocks (`tests/runtime/test_torch_exec.py`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch

from optc.errors import OptcError, PreconditionError
from optc.ir import DataType, Model, Node, Value, annotations, node_label
from optc.ir.patterns.ops import QDQ_OPS

__all__ = ["SUPPORTED_OPS", "TorchExecutor", "default_trainable", "to_torch"]

#: ONNX element types → torch dtypes (INT4/UINT4 live in int8/uint8 tensors).
_TORCH_DTYPES: dict[DataType, torch.dtype] = {
    DataType.FLOAT: torch.float32,
    DataType.FLOAT16: torch.float16,
    DataType.BFLOAT16: torch.bfloat16,
    DataType.DOUBLE: torch.float64,
    DataType.INT64: torch.int64,
    DataType.INT32: torch.int32,
    DataType.INT16: torch.int16,
    DataType.INT8: torch.int8,
    DataType.UINT8: torch.uint8,
    DataType.UINT16: torch.uint16,
    DataType.UINT32: torch.uint32,
    DataType.UINT64: torch.uint64,
    DataType.BOOL: torch.bool,
    DataType.INT4: torch.int8,
    DataType.UINT4: torch.uint8,
    DataType.FLOAT8E4M3FN: torch.float8_e4m3fn,
    DataType.FLOAT8E5M2: torch.float8_e5m2,
}
#: Integer ranges of the quantized types (INT4/UINT4 by their ONNX type).
_QRANGE: dict[DataType, tuple[int, int]] = {
    DataType.INT8: (-128, 127),
    DataType.UINT8: (0, 255),
    DataType.INT16: (-32768, 32767),
    DataType.UINT16: (0, 65535),
    DataType.INT4: (-8, 7),
    DataType.UINT4: (0, 15),
    DataType.INT32: (-(2**31), 2**31 - 1),
}
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_FLOAT_DTYPES = (DataType.FLOAT, DataType.FLOAT16, DataType.BFLOAT16, DataType.DOUBLE)


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor owning a copy of `array` (ml_dtypes' int4/uint4, bfloat16 and FP8 included)."""
    dtype = array.dtype
    if dtype == ml_dtypes.int4:
        return torch.from_numpy(array.astype(np.int8))
    if dtype == ml_dtypes.uint4:
        return torch.from_numpy(array.astype(np.uint8))
    if dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16)
    if dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(np.array(array).view(np.uint8)).view(torch.float8_e4m3fn)
    if dtype == ml_dtypes.float8_e5m2:
        return torch.from_numpy(np.array(array).view(np.uint8)).view(torch.float8_e5m2)
    return torch.from_numpy(np.array(array, copy=True))


def _shared_torch(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory when numpy and torch share the dtype (no copy of a memory-mapped
    weight; the executor never writes into constants), else a copy."""
    if array.dtype.kind in "fiub" and array.dtype.isnative and array.flags.c_contiguous and array.dtype != np.uint16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memory maps: torch warns it cannot write them
            return torch.from_numpy(array)
    return to_torch(array)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of a tensor (FP8 and bfloat16 as ml_dtypes arrays)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.float8_e5m2:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e5m2)
    return t.numpy()


def default_trainable(model: Model) -> list[str]:
    """The float weights a fine-tuning pass may change, in graph order.

    A float initializer is a weight when the frontend recorded its original
    parameter name (`source_name`, so buffers such as rotary frequencies stay
    fixed); in a model without any, every float initializer with at least two
    elements. Quantization scales and zero points (inputs of Q/DQ) and graph
    inputs never are.
    """
    graph = model.graph
    candidates = [v for v in graph.initializers.values()
                  if v.const_value is not None and not v.is_graph_input() and v.dtype in _FLOAT_DTYPES
                  and not any(c.op_type in QDQ_OPS for c in v.consumers())]
    named = [v for v in candidates if "source_name" in annotations(v)]
    if any("source_name" in annotations(v) for v in graph.initializers.values()):
        return [v.name for v in named]
    return [v.name for v in candidates if v.const_value.size >= 2]


# --------------------------------------------------------------------------------------------- ops

Tensors = list[torch.Tensor | None]
OpFn = Callable[[Tensors, dict[str, Any], int], "torch.Tensor | Sequence[torch.Tensor | None]"]
_OPS: dict[str, OpFn] = {}


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            _OPS[name] = fn
        return fn
    return register


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda x, attrs, opset: fn(x[0], x[1])


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda x, attrs, opset: fn(x[0])


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
    "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "MatMul": torch.matmul,
}.items():
    _OPS[_name] = _binary(_fn)

for _name, _fn in {
    "Neg": torch.neg, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Cos": torch.cos, "Sin": torch.sin,
    "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Abs": torch.abs, "Erf": torch.erf, "Not": torch.logical_not, "IsNaN": torch.isnan, "Floor": torch.floor,
    "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Identity": lambda t: t,
    "Softplus": torch.nn.functional.softplus,
}.items():
    _OPS[_name] = _unary(_fn)


@_op("Div")
def _div(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    a, b = x[0], x[1]
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@_op("Pow")
def _pow(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    base, exponent = x[0], x[1]
    if exponent.numel() == 1 and exponent.dim() == 0 and float(exponent) == 2.0 and base.is_floating_point():
        return base * base  # what onnxruntime computes for a square
    return torch.pow(base, exponent.to(base.dtype) if base.is_floating_point() else exponent).to(base.dtype)


def _make_variadic(name: str) -> OpFn:
    step = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[name]

    def run(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
        out = x[0]
        for other in x[1:]:
            out = step(out, other)
        return out / len(x) if name == "Mean" else out
    return run


for _name in ("Max", "Min", "Sum", "Mean"):
    _OPS[_name] = _make_variadic(_name)


@_op("IsInf")
def _isinf(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    return (torch.isposinf(t) & bool(pos)) | (torch.isneginf(t) & bool(neg))


@_op("LeakyRelu")
def _leaky_relu(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return torch.nn.functional.leaky_relu(x[0], attrs.get("alpha", 0.01))


@_op("Gelu")
def _gelu(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return torch.nn.functional.gelu(x[0], approximate=attrs.get("approximate", "none"))


@_op("Clip")
def _clip(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    low = x[1] if len(x) > 1 and x[1] is not None else attrs.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else attrs.get("max")
    if low is not None:
        t = torch.maximum(t, torch.as_tensor(low, dtype=t.dtype, device=t.device))
    if high is not None:
        t = torch.minimum(t, torch.as_tensor(high, dtype=t.dtype, device=t.device))
    return t


@_op("Where")
def _where(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return torch.where(x[0], x[1], x[2])


def _make_softmax(log: bool) -> OpFn:
    def run(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
        t = x[0]
        axis = _axis(attrs.get("axis", -1 if opset >= 13 else 1), t.dim())
        if opset < 13:  # coerced to 2-D around `axis`
            flat = t.reshape(int(np.prod(t.shape[:axis], dtype=np.int64)), -1)
            out = torch.log_softmax(flat, -1) if log else torch.softmax(flat, -1)
            return out.reshape(t.shape)
        return torch.log_softmax(t, axis) if log else torch.softmax(t, axis)
    return run


_OPS["Softmax"], _OPS["LogSoftmax"] = _make_softmax(False), _make_softmax(True)


@_op("Gemm")
def _gemm(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    a, b = x[0], x[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    out = (a @ b) * attrs.get("alpha", 1.0) if attrs.get("alpha", 1.0) != 1.0 else a @ b
    if len(x) > 2 and x[2] is not None:
        beta = attrs.get("beta", 1.0)
        out = out + (x[2] * beta if beta != 1.0 else x[2])
    return out


@_op("MaxPool")
def _max_pool(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    """MaxPool (values only; the optional Indices output is not produced)."""
    t = x[0]
    kernel = list(attrs["kernel_shape"])
    spatial = len(kernel)
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or attrs.get("storage_order", 0):
        raise OptcError("torch executor: MaxPool with auto_pad or storage_order is not supported; give explicit pads")
    pads = list(attrs.get("pads", [0] * 2 * spatial)) if attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * 2 * spatial
    begin, end = pads[:spatial], pads[spatial:]
    padding: list[int] = begin
    if begin != end:  # asymmetric: pad with -inf, which no window's maximum takes
        flat: list[int] = []
        for b, e in zip(reversed(begin), reversed(end), strict=True):
            flat += [b, e]
        t = torch.nn.functional.pad(t, flat, value=float("-inf"))
        padding = [0] * spatial
    pool = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d, 3: torch.nn.functional.max_pool3d}.get(spatial)
    if pool is None:
        raise OptcError(f"torch executor: MaxPool over {spatial} spatial axes is not supported")
    return pool(t, kernel, stride=list(attrs.get("strides", [1] * spatial)), padding=padding,
                dilation=list(attrs.get("dilations", [1] * spatial)), ceil_mode=bool(attrs.get("ceil_mode", 0)))


@_op("TopK")
def _top_k(x: Tensors, attrs: dict[str, Any], opset: int) -> list[torch.Tensor]:
    """TopK: values and int64 indices (ties in torch's order, which ONNX leaves open only for equal values)."""
    t = x[0]
    k = _ints(x[1])[0] if len(x) > 1 and x[1] is not None else int(attrs["k"])
    values, indices = torch.topk(t, k, dim=_axis(attrs.get("axis", -1), t.dim()),
                                 largest=bool(attrs.get("largest", 1)), sorted=bool(attrs.get("sorted", 1)))
    return [values, indices.to(torch.int64)]


@_op("Conv")
def _conv(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    spatial = w.dim() - 2
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise OptcError(f"torch executor: Conv auto_pad={attrs['auto_pad']} is not supported; give explicit pads")
    pads = list(attrs.get("pads", [0] * 2 * spatial)) if attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * 2 * spatial
    begin, end = pads[:spatial], pads[spatial:]
    padding: int | list[int] = begin
    if begin != end:
        flat: list[int] = []
        for b, e in zip(reversed(begin), reversed(end), strict=True):
            flat += [b, e]
        t = torch.nn.functional.pad(t, flat)
        padding = 0
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}.get(spatial)
    if conv is None:
        raise OptcError(f"torch executor: Conv over {spatial} spatial axes is not supported")
    return conv(t, w, bias, stride=list(attrs.get("strides", [1] * spatial)), padding=padding,
                dilation=list(attrs.get("dilations", [1] * spatial)), groups=attrs.get("group", 1))


@_op("LayerNormalization")
def _layer_norm(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = _axis(attrs.get("axis", -1), t.dim())
    dims = tuple(range(axis, t.dim()))
    work = t.float() if attrs.get("stash_type", 1) == 1 and t.dtype in (torch.float16, torch.bfloat16) else t
    mean = work.mean(dims, keepdim=True)
    centered = work - mean
    var = (centered * centered).mean(dims, keepdim=True)
    out = (centered * torch.rsqrt(var + attrs.get("epsilon", 1e-5))).to(t.dtype) * scale
    return out + bias if bias is not None else out


def _make_reduce(name: str) -> OpFn:
    axes_as_input = {"ReduceSum": 13}.get(name, 18)

    def run(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
        t = x[0]
        axes = _ints(x[1]) if opset >= axes_as_input and len(x) > 1 else list(attrs.get("axes", []))
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return t
            axes = list(range(t.dim()))
        dims = sorted(_axis(a, t.dim()) for a in axes)
        if name == "ReduceMean":
            return t.mean(dims, keepdim=keep)
        if name == "ReduceSum":
            return t.sum(dims, keepdim=keep)
        if name == "ReduceSumSquare":
            return (t * t).sum(dims, keepdim=keep)
        if name == "ReduceL2":
            return (t * t).sum(dims, keepdim=keep).sqrt()
        out = t
        for d in reversed(dims):
            if name == "ReduceMax":
                out = out.amax(d, keepdim=keep)
            elif name == "ReduceMin":
                out = out.amin(d, keepdim=keep)
            else:
                out = out.prod(d, keepdim=keep)
        return out
    return run


for _name in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL2"):
    _OPS[_name] = _make_reduce(_name)


@_op("Shape")
def _shape(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    dims = list(x[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[slice(start, end)], dtype=torch.int64, device=x[0].device)


@_op("Size")
def _size(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)


@_op("Reshape")
def _reshape(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t, shape = x[0], _ints(x[1])
    if not attrs.get("allowzero", 0):
        shape = [t.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return t.reshape(shape)


@_op("Flatten")
def _flatten(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    axis = _axis(attrs.get("axis", 1), t.dim())
    return t.reshape(int(np.prod(t.shape[:axis], dtype=np.int64)), -1)


@_op("Transpose")
def _transpose(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    perm = attrs.get("perm") or list(reversed(range(t.dim())))
    return t.permute(list(perm))


@_op("Unsqueeze")
def _unsqueeze(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    axes = _ints(x[1]) if opset >= 13 else list(attrs["axes"])
    rank = t.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        t = t.unsqueeze(a)
    return t


@_op("Squeeze")
def _squeeze(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    axes = (_ints(x[1]) if len(x) > 1 else []) if opset >= 13 else list(attrs.get("axes", []))
    if not axes:
        return t.squeeze()
    for a in sorted((_axis(a, t.dim()) for a in axes), reverse=True):
        t = t.squeeze(a)
    return t


@_op("Concat")
def _concat(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return torch.cat([t for t in x if t is not None], dim=attrs["axis"])


def _run_split(x: Tensors, attrs: dict[str, Any], opset: int, outputs: int) -> list[torch.Tensor]:
    t = x[0]
    axis = _axis(attrs.get("axis", 0), t.dim())
    sizes = _ints(x[1]) if opset >= 13 and len(x) > 1 and x[1] is not None else list(attrs.get("split", []))
    if not sizes:
        dim = t.shape[axis]
        chunk = -(-dim // outputs)
        sizes = [min(chunk, dim - i * chunk) for i in range(outputs)]
    return list(torch.split(t, sizes, dim=axis))


@_op("Slice")
def _slice(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, t.dim())
        first, stop, stride = slice(start, end, step).indices(t.shape[axis])
        if stride > 0:
            index = [slice(None)] * axis + [slice(first, stop, stride)]
            t = t[tuple(index)]
        else:
            picks = torch.arange(first, stop, stride, device=t.device)
            t = t.index_select(axis, picks)
    return t


@_op("Gather")
def _gather(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    data, idx = x[0], x[1].long()
    axis = _axis(attrs.get("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    picked = data.index_select(axis, idx.reshape(-1))
    return picked.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


@_op("GatherElements")
def _gather_elements(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    data, idx = x[0], x[1].long()
    axis = _axis(attrs.get("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


@_op("GatherND")
def _gather_nd(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    data, idx = x[0], x[1].long()
    if attrs.get("batch_dims", 0):
        raise OptcError("torch executor: GatherND with batch_dims > 0 is not supported")
    k = idx.shape[-1]
    sizes = torch.tensor(list(data.shape[:k]), dtype=torch.int64, device=idx.device)
    idx = torch.where(idx < 0, idx + sizes, idx)
    return data[tuple(idx[..., i] for i in range(k))]


@_op("Expand")
def _expand(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    shape = torch.broadcast_shapes(tuple(t.shape), tuple(_ints(x[1])))
    return t.expand(shape)


@_op("Tile")
def _tile(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return x[0].repeat(_ints(x[1]))


@_op("Range")
def _range(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    start, limit, delta = x[0], x[1], x[2]
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@_op("CumSum")
def _cumsum(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    t = x[0]
    axis = _axis(int(x[1].reshape(-1)[0]), t.dim())
    if attrs.get("reverse", 0):
        t = t.flip(axis)
    out = torch.cumsum(t, axis, dtype=t.dtype)
    if attrs.get("exclusive", 0):
        out = out - t
    return out.flip(axis) if attrs.get("reverse", 0) else out


@_op("Trilu")
def _trilu(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    k = int(x[1]) if len(x) > 1 and x[1] is not None else 0
    return torch.triu(x[0], k) if attrs.get("upper", 1) else torch.tril(x[0], k)


@_op("Cast")
def _cast(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return _cast_to(x[0], _torch_dtype(DataType(attrs["to"])))


@_op("CastLike")
def _cast_like(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return _cast_to(x[0], x[1].dtype)


def _cast_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in _FP8_MAX and t.is_floating_point():
        t = t.float().clamp(-_FP8_MAX[dtype], _FP8_MAX[dtype])
    return t.to(dtype)


@_op("ConstantOfShape")
def _constant_of_shape(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    value = attrs.get("value")
    fill = to_torch(value.numpy()) if value is not None else torch.zeros(1, dtype=torch.float32)
    return fill.reshape(-1)[0].to(x[0].device).expand(_ints(x[0])).clone()


@_op("Dropout")
def _dropout(x: Tensors, attrs: dict[str, Any], opset: int) -> list[torch.Tensor]:
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)]


def _broadcast_param(param: torch.Tensor, t: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """A scale or zero point laid out to broadcast against `t` (per tensor, per axis or blocked)."""
    if param.dim() == 0 or param.numel() == 1 and block == 0:
        return param.reshape(())
    axis = _axis(axis, t.dim())
    if block:
        return param.repeat_interleave(block, dim=axis).narrow(axis, 0, t.shape[axis])
    shape = [1] * t.dim()
    shape[axis] = -1
    return param.reshape(shape)


@_op("DequantizeLinear")
def _dequantize(x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    q, scale = x[0], x[1]
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    values = q.to(torch.float32)
    if len(x) > 2 and x[2] is not None:
        values = values - _broadcast_param(x[2], q, axis, block).to(torch.float32)
    return (values * _broadcast_param(scale, q, axis, block).to(torch.float32)).to(scale.dtype)


class _QuantizeLinear:
    """QuantizeLinear needs its output's ONNX type (for INT4/UINT4 ranges); bound per node."""

    def __init__(self, out_type: DataType | None) -> None:
        self.out_type = out_type

    def __call__(self, x: Tensors, attrs: dict[str, Any], opset: int) -> torch.Tensor:
        t, scale = x[0], x[1]
        zero = x[2] if len(x) > 2 else None
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        out_type = self.out_type
        if out_type is None:
            out_type = DataType(attrs["output_dtype"]) if attrs.get("output_dtype") else DataType.UINT8
        dtype = _torch_dtype(out_type)
        scaled = t.to(torch.float32) / _broadcast_param(scale, t, axis, block).to(torch.float32)
        if dtype in _FP8_MAX:
            if attrs.get("saturate", 1):
                scaled = scaled.clamp(-_FP8_MAX[dtype], _FP8_MAX[dtype])
            return scaled.to(dtype)
        rounded = torch.round(scaled)
        if zero is not None:
            rounded = rounded + _broadcast_param(zero, t, axis, block).to(torch.float32)
        low, high = _QRANGE[out_type]
        return rounded.clamp(low, high).to(dtype)


#: Every op the executor runs (default ONNX domain).
SUPPORTED_OPS = frozenset([*_OPS, "Constant", "QuantizeLinear", "Split"])


def _torch_dtype(dtype: DataType) -> torch.dtype:
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise OptcError(f"torch executor: element type {dtype.name} is not supported") from None


def _attributes(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, attr in node.attributes.items():
        value = attr.value
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _constant_value(node: Node) -> torch.Tensor:
    attrs = _attributes(node)
    if "value" in attrs:
        return to_torch(attrs["value"].numpy())
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return torch.from_numpy(np.asarray(attrs[key], dtype=dtype))
    raise OptcError(f"torch executor: Constant node {node_label(node)} has no supported value attribute ({', '.join(attrs)})")


# --------------------------------------------------------------------------------------------- executor

@dataclasses.dataclass
class _Step:
    fn: OpFn
    inputs: list[int | None]
    outputs: list[int | None]
    attrs: dict[str, Any]
    label: str
    op_type: str
    #: Slots whose last reader is this step (freed after it).
    release: list[int] = dataclasses.field(default_factory=list)


class TorchExecutor(torch.nn.Module):
    """An `nn.Module` that runs an optc IR model with PyTorch ops (see the module docstring).

    `trainable`: names of float initializers to hold as `nn.Parameter`s
    (default `default_trainable(model)`; pass `()` for a frozen executor).
    The IR is read once, at construction; the module keeps no reference to it.
    """

    def __init__(self, model: Model, trainable: Iterable[str] | None = None) -> None:
        super().__init__()
        graph = model.graph
        opset = model.opset_imports.get("", graph.opset_imports.get("", 21))
        wanted = set(default_trainable(model) if trainable is None else trainable)
        slots: dict[Value, int] = {}

        def slot(value: Value) -> int:
            if value not in slots:
                slots[value] = len(slots)
            return slots[value]

        self.params = torch.nn.ParameterList()
        #: IR initializer name of each parameter, in `self.params` order.
        self.param_names: list[str] = []
        self._param_slots: list[int] = []
        self._const_slots: list[int] = []
        for name, value in graph.initializers.items():
            if value.is_graph_input() or value.const_value is None:
                continue
            data = value.const_value.numpy()
            if name in wanted:
                if value.dtype not in _FLOAT_DTYPES:
                    raise OptcError(f"torch executor: initializer {name!r} is {value.dtype.name}, only float weights can be trained")
                self.params.append(torch.nn.Parameter(to_torch(data)))
                self.param_names.append(name)
                self._param_slots.append(slot(value))
            else:
                self.register_buffer(f"const{len(self._const_slots)}", _shared_torch(data), persistent=False)
                self._const_slots.append(slot(value))
        unknown = wanted - set(self.param_names)
        if unknown:
            raise OptcError(f"torch executor: no float initializer named {sorted(unknown)[0]!r} to train")

        self.input_names = [v.name for v in graph.inputs if not (v.const_value is not None and v.name in graph.initializers)]
        self._input_slots = [slot(v) for v in graph.inputs if v.name in self.input_names]
        self.output_names = [v.name for v in graph.outputs]
        self._opset = opset
        self._named: dict[str, int] = {}
        self._steps: list[_Step] = []
        self._plans: dict[tuple[int, ...], list[list[int]]] = {}
        for node in graph:
            self._add_node(node, opset, slot)
        for value, index in slots.items():
            if value.name:
                self._named.setdefault(value.name, index)
        self._output_slots = [slots[v] for v in graph.outputs]
        self._slot_count = len(slots)
        self._last_use = self._compute_last_use()

    def _add_node(self, node: Node, opset: int, slot: Callable[[Value], int]) -> None:
        label = node_label(node)
        if node.domain not in ("", "ai.onnx"):
            raise PreconditionError(f"torch executor: unsupported op {node.domain}::{node.op_type} (node {label})")
        if any(attr.type.name in ("GRAPH", "GRAPHS") for attr in node.attributes.values()):
            raise PreconditionError(f"torch executor: unsupported op {node.op_type} with a subgraph (node {label})")
        attrs = _attributes(node)
        outputs = [slot(v) if v.name or v.uses() else None for v in node.outputs]
        if node.op_type == "Constant":
            self.register_buffer(f"const{len(self._const_slots)}", _constant_value(node), persistent=False)
            self._const_slots.append(outputs[0])
            return
        fn: OpFn | None
        if node.op_type == "QuantizeLinear":
            out_type = node.inputs[2].dtype if len(node.inputs) > 2 and node.inputs[2] is not None else None
            fn = _QuantizeLinear(out_type)
        elif node.op_type == "Split":
            count = len(node.outputs)
            fn = lambda x, a, o, n=count: _run_split(x, a, o, n)  # noqa: E731
        else:
            fn = _OPS.get(node.op_type)
        if fn is None:
            raise PreconditionError(f"torch executor: unsupported op {node.op_type} (node {label})")
        inputs = [slot(v) if v is not None else None for v in node.inputs]
        self._steps.append(_Step(fn, inputs, outputs, attrs, label, node.op_type))

    def _compute_last_use(self) -> dict[int, int]:
        last: dict[int, int] = {}
        for i, step in enumerate(self._steps):
            for s in step.inputs:
                if s is not None:
                    last[s] = i
        return last

    def _constants(self) -> list[torch.Tensor]:
        return [getattr(self, f"const{i}") for i in range(len(self._const_slots))]

    def forward(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Run the graph; returns the graph outputs (or the named values) as torch tensors."""
        device = self._device()
        values: list[torch.Tensor | None] = [None] * self._slot_count
        for index, tensor in zip(self._const_slots, self._constants(), strict=True):
            values[index] = tensor
        for index, param in zip(self._param_slots, self.params, strict=True):
            values[index] = param
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OptcError(f"torch executor: missing input {missing[0]!r} (inputs: {', '.join(self.input_names)})")
        for name, index in zip(self.input_names, self._input_slots, strict=True):
            feed = feeds[name]
            values[index] = (feed if isinstance(feed, torch.Tensor) else to_torch(np.asarray(feed))).to(device)
        wanted = self._wanted_slots(outputs)
        release = self._release_plan(tuple(wanted))
        for i, step in enumerate(self._steps):
            args = [values[s] if s is not None else None for s in step.inputs]
            try:
                result = step.fn(args, step.attrs, self._opset)
            except OptcError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch raises many types; name the node
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise OptcError(f"torch executor: {step.op_type} node {step.label} failed: {first}") from exc
            results = [result] if isinstance(result, torch.Tensor) else list(result)
            for s, r in zip(step.outputs, results, strict=False):
                if s is not None:
                    values[s] = r
            for s in release[i]:
                values[s] = None
        return [values[s] for s in wanted]  # type: ignore[misc]

    def _wanted_slots(self, outputs: Sequence[str] | None) -> list[int]:
        if outputs is None:
            return list(self._output_slots)
        unknown = [n for n in outputs if n not in self._named]
        if unknown:
            raise OptcError(f"torch executor: the model has no value named {unknown[0]!r}")
        return [self._named[n] for n in outputs]

    def _release_plan(self, wanted: tuple[int, ...]) -> list[list[int]]:
        """For each step, the slots to free after it: values past their last reader (and unread outputs)."""
        plan = self._plans.get(wanted)
        if plan is None:
            keep = set(wanted) | set(self._const_slots) | set(self._param_slots)
            plan = [[] for _ in self._steps]
            for i, step in enumerate(self._steps):
                plan[i] += [s for s in step.outputs if s is not None and s not in keep and s not in self._last_use]
            for s, i in self._last_use.items():
                if s not in keep:
                    plan[i].append(s)
            self._plans[wanted] = plan
        return plan

    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """`ModelRunner.run`'s interface: numpy feeds in, the named values (default: outputs) as numpy out."""
        wanted = list(names) if names is not None else self.output_names
        return dict(zip(wanted, (to_numpy(t) for t in self(feed, wanted)), strict=True))

    def weights(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by IR initializer name."""
        return dict(zip(self.param_names, self.params, strict=True))

    @torch.no_grad()
    def write_back(self, model: Model) -> int:
        """Copy every parameter into the matching initializer of `model` (same name, shape, dtype); returns the count."""
        from optc.ir import tensor

        graph = model.graph
        for name, param in zip(self.param_names, self.params, strict=True):
            value = graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise OptcError(f"torch executor: the model has no initializer {name!r} to write back")
            old = value.const_value
            if tuple(old.shape) != tuple(param.shape):
                raise OptcError(f"torch executor: initializer {name!r} is {list(old.shape)}, the trained weight {list(param.shape)}")
            array = to_numpy(param.to(_torch_dtype(value.dtype)))
            value.const_value = tensor(array, name=name)
        return len(self.param_names)
