"""`check-sparsity`: verify that every weight annotated with an N:M pattern still has it.

For each node annotated `sparsity` with a pattern `N:M` (what `sparsify`
writes), the weight it reads is evaluated back to numbers through the
constant-only chain in front of it (DequantizeLinear per tensor, per axis or
blocked, Cast, Transpose, Reshape, Identity), so the check also holds after a
later quantization pass: a zero must dequantize to exactly zero. The groups
of M run along the reduction axis K of the weight as the op reads it (MatMul
B: axis -2; Gemm: axis 1 with `transB=1`, else 0), the axis TensorRT checks.
Float initializers annotated `sparsity` are checked along their annotated
axis as well. The pass changes nothing and fails with one line naming the
first violating weight.
"""

from __future__ import annotations

import numpy as np

from optc.errors import OptcError
from optc.ir import (
    DataType,
    Model,
    Node,
    Value,
    annotation,
    constant_array,
    is_constant,
    node_label,
    transpose_perm,
)
from optc.ir.annotations import SPARSITY
from optc.ir.patterns.ops import GEMM_OPS
from optc.ir.patterns.weights import weight_axes
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass
from optc.passes.transforms.sparsify import parse_pattern


def effective_weight(value: Value, depth: int = 8) -> np.ndarray | None:
    """The float value of a weight computed from constants only (through DQ/Cast/Transpose/...), else None."""
    if value is None:
        return None
    if is_constant(value):
        return constant_array(value).astype(np.float64)
    node = value.producer()
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in ("Cast", "Identity"):
        return effective_weight(node.inputs[0], depth - 1)
    if op == "Transpose":
        x = effective_weight(node.inputs[0], depth - 1)
        if x is None:
            return None
        return np.transpose(x, transpose_perm(node, x.ndim))
    if op == "Reshape":
        x = effective_weight(node.inputs[0], depth - 1)
        shape = constant_array(node.inputs[1])
        return None if x is None or shape is None else x.reshape([int(s) for s in shape])
    if op == "DequantizeLinear":
        return _dequantize(node)
    return None


def _dequantize(node: Node) -> np.ndarray | None:
    q = constant_array(node.inputs[0])
    scale = constant_array(node.inputs[1])
    if q is None or scale is None:
        return None
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = constant_array(zp_value) if zp_value is not None else None
    if zp_value is not None and zp is None:
        return None
    x = q.astype(np.float64)
    scale = scale.astype(np.float64)
    zp = np.zeros_like(scale) if zp is None else zp.astype(np.float64)
    if scale.ndim == 0 or scale.size == 1:
        return (x - zp.reshape(())) * scale.reshape(())
    axis_attr = node.attributes.get("axis")
    axis = (axis_attr.as_int() if axis_attr is not None else 1) % x.ndim
    block_attr = node.attributes.get("block_size")
    block = block_attr.as_int() if block_attr is not None else 0
    if block:
        scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, n) for n in x.shape)]
        zp = np.repeat(zp, block, axis=axis)[tuple(slice(0, n) for n in x.shape)]
        return (x - zp) * scale
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zp.reshape(shape)) * scale.reshape(shape)


#: The ops whose N:M weights are checked: the linear layers `sparsify` annotates, and Conv (TensorRT's
#: sparse kernels take both). Any other annotated op is reported as having no known K axis.
CHECKED_OPS = (*GEMM_OPS, "Conv")


def nm_violations(array: np.ndarray, axis: int, n: int, m: int) -> int:
    """How many groups of M consecutive entries along `axis` hold more than N non-zeros (-1: K % M != 0)."""
    moved = np.moveaxis(array, axis, -1)
    k = moved.shape[-1]
    if k % m:
        return -1
    groups = (moved.reshape(-1, k // m, m) != 0).sum(axis=-1)
    return int((groups > n).sum())


def check_nm_sparsity(model: Model) -> tuple[int, list[str]]:
    """Check every annotated weight: (weights checked, one line per violation: "node (weight): what is wrong").
    Unstructured annotations are only counted."""
    checked = 0
    problems: list[str] = []
    seen: set[int] = set()

    def check(array: np.ndarray | None, axis: int, pattern: str, node: str, weight: str) -> None:
        nonlocal checked
        nm = parse_pattern(pattern)
        if nm is None:
            return
        if array is None:
            problems.append(f"{node} ({weight}): the weight cannot be read back from constants")
            return
        checked += 1
        bad = nm_violations(array, axis, *nm)
        if bad < 0:
            problems.append(f"{node} ({weight}): K={array.shape[axis]} is not a multiple of {nm[1]}")
        elif bad:
            problems.append(f"{node} ({weight}): {bad} group(s) of {nm[1]} along K hold more than {nm[0]} non-zeros")

    for node in model.graph:
        info = annotation(node, SPARSITY)
        if not info or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if node.op_type not in CHECKED_OPS:
            problems.append(f"{node_label(node)} ({weight.name or ''}): {node.op_type} has no known K axis")
            continue
        seen.add(id(weight))
        array = effective_weight(weight)
        axis = weight_axes(node, array.ndim if array is not None else 2)[1]  # K as the op reads the weight
        check(array, axis, info["pattern"], node_label(node), weight.name or "")
    for value in model.graph.initializers.values():
        info = annotation(value, SPARSITY)
        if not info or id(value) in seen or value.dtype not in (DataType.FLOAT, DataType.FLOAT16, DataType.BFLOAT16):
            continue
        if not list(value.uses()):
            continue
        check(constant_array(value).astype(np.float64), int(info["axis"]), info["pattern"], "initializer", value.name or "")
    return checked, problems


@register_pass("check-sparsity")
class CheckSparsity(Pass):
    """Verify that each weight annotated N:M (by sparsify) keeps at most N non-zeros per M along K."""

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        checked, problems = check_nm_sparsity(model)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise OptcError(f"check-sparsity: {problems[0]}{more}")
        return PassResult(model, False, None, {"weights-checked": checked})


__all__ = ["CheckSparsity", "check_nm_sparsity", "effective_weight", "nm_violations"]
