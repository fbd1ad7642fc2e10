"""Shared helpers of the pruning and low-rank passes: linear layers, name matching, weight I/O.

Linear layers are found by graph pattern: a `MatMul` or `Gemm` whose second
input is a constant 2-D float initializer (B `[K, N]`; Gemm `[N, K]` with
`transB=1`). Weights are handled in the layout of the papers, `[N, K]` (rows
are outputs, columns the reduction axis K), and written back in the stored
layout. A constant that something else also reads is copied, never changed
under that reader.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from optc.errors import OptcError
from optc.ir import (
    DataType,
    Model,
    Node,
    Shape,
    Value,
    add_initializer,
    annotation,
    constant_array,
    is_constant,
    node_label,
    source_name,
    tensor,
    unique_name,
)

FLOAT_TYPES = (DataType.FLOAT, DataType.FLOAT16, DataType.BFLOAT16)
#: Default exclusions of `sparsify`/`lowrank`: the output head and embedding tables.
DEFAULT_EXCLUDE = ("lm_head", "embed", "wte", "word_embeddings")


@dataclass(frozen=True)
class Linear:
    """A linear layer `Y = X·W`: the node, its constant weight and the weight's K (reduction) axis."""

    node: Node
    weight: Value
    k_axis: int  # 0 for MatMul / Gemm(transB=0), 1 for Gemm(transB=1)

    @property
    def activation(self) -> Value:
        return self.node.inputs[0]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[self.k_axis])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1 - self.k_axis])

    def nk(self) -> np.ndarray:
        """The weight as float32 `[N, K]`."""
        w = constant_array(self.weight).astype(np.float32)
        return np.ascontiguousarray(w.T if self.k_axis == 0 else w)


def linear(node: Node) -> Linear | None:
    """The `Linear` view of `node` when it is X·W with a constant 2-D float W, else None."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or is_constant(x) or not is_constant(w):
        return None
    if w.shape is None or len(w.shape) != 2 or w.dtype not in FLOAT_TYPES:
        return None
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        if trans_a is not None and trans_a.as_int():
            return None
        trans_b = node.attributes.get("transB")
        return Linear(node, w, 1 if trans_b is not None and trans_b.as_int() else 0)
    return Linear(node, w, 0)


def linears(model: Model) -> list[Linear]:
    """Every linear layer of the main graph, in graph order."""
    return [site for site in (linear(n) for n in model.graph) if site is not None]


def names_of(site: Linear) -> list[str]:
    """The names a pattern may match: node, outputs, weight, original parameter name and its aliases."""
    names = [node_label(site.node), *(o.name for o in site.node.outputs if o.name)]
    names += [site.weight.name or "", source_name(site.weight), *(annotation(site.weight, "source_aliases") or [])]
    return [n for n in names if n]


def matches(site: Linear, patterns: Iterable[str]) -> bool:
    """True when a pattern (substring, or glob with * ? [) matches one of the site's names."""
    names = names_of(site)
    for pattern in patterns:
        glob = any(ch in pattern for ch in "*?[")
        for name in names:
            if (glob and fnmatch.fnmatchcase(name, pattern)) or (not glob and pattern in name):
                return True
    return False


def reads_table(value: Value) -> bool:
    """True when `value` is also read as an embedding table (a Gather's data input)."""
    return any(use.node.op_type == "Gather" and use.idx == 0 for use in value.uses())


def select(model: Model, include: Sequence[str], exclude: Sequence[str]) -> list[Linear]:
    """The linear layers to transform: those matching `include` (empty: all), minus `exclude` and embeddings."""
    sites = []
    for site in linears(model):
        if include and not matches(site, include):
            continue
        if matches(site, exclude) or reads_table(site.weight):
            continue
        sites.append(site)
    return sites


def set_constant(graph, node: Node, index: int, array: np.ndarray, suffix: str) -> Value:
    """Give `node.inputs[index]` the value `array`: in place when only this input reads it, else a copy."""
    value = node.inputs[index]
    uses = list(value.uses())
    if len(uses) == 1 and not value.is_graph_output():
        value.const_value = tensor(array, name=value.name)
        value.shape = Shape(list(array.shape))
        return value
    new = add_initializer(graph, unique_name(graph, f"{value.name}_{suffix}"), array)
    for k, v in value.metadata_props.items():
        new.metadata_props[k] = v
    node.replace_input_with(index, new)
    return new


def store_nk(graph, site: Linear, w_nk: np.ndarray, suffix: str) -> Value:
    """Write a `[N, K]` float array back as the site's weight, in its stored layout and dtype."""
    dtype = constant_array(site.weight).dtype
    stored = (w_nk.T if site.k_axis == 0 else w_nk).astype(dtype)
    return set_constant(graph, site.node, 1, np.ascontiguousarray(stored), suffix)


def calibration_hessians(model: Model, am, who: str, values: Sequence[str] | None = None) -> dict:
    """The `hessian` analysis (XᵀX of each linear input; only `values` when given), one-line error without data."""
    from optc.passes.analyses.hessian import Hessian
    from optc.passes.analyses.runner import calibration_spec

    try:
        calibration_spec(model, am.context)
    except OptcError as exc:
        message = str(exc).split(": ", 1)[-1]
        raise OptcError(f"{who} needs calibration data: {message}") from exc
    if values is None:
        return am.get(Hessian, model)
    return am.get(Hessian, model, values=tuple(sorted(set(values))))


@contextlib.contextmanager
def torch_threads() -> Iterator[None]:
    """Run small per-layer torch work on one CPU thread (`OPTC_TORCH_THREADS` to change), then restore.

    torch's OpenMP threads spin-wait: on a loaded 2-core machine SparseGPT's column loop ran 12x slower
    with 2 threads than with 1 (measured).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("OPTC_TORCH_THREADS", "1"))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def drop_unused_initializers(graph) -> int:
    """Remove initializers nothing reads; returns how many went."""
    dead = [name for name, v in graph.initializers.items() if not list(v.uses()) and not v.is_graph_output()]
    for name in dead:
        graph.initializers.pop(name)
    return len(dead)


__all__ = [
    "DEFAULT_EXCLUDE",
    "Linear",
    "calibration_hessians",
    "drop_unused_initializers",
    "linear",
    "linears",
    "matches",
    "select",
    "set_constant",
    "store_nk",
    "torch_threads",
]
