"""Linear layers in the IR, and how passes name and select them.

Shared by the weight passes (`quantize`, `rtn`/`gptq`/`awq`, `sparsify`,
`lowrank`, the pruning passes):

* `linear(node)`: the `Linear` view of `Y = X·W` (MatMul, or Gemm without
  transA) with a constant 2-D float W, and W's reduction (K) axis.
* `layer_names(node, weight)` / `matches_any(names, patterns)`: the names an
  `exclude=`-style pattern may match (node, outputs, weight, the original
  parameter name and its aliases), as a substring or, with `* ? [`, a glob.
* `experts(node)`: the `Experts` view of a mixture of experts' stacked weight
  `W [E, ...]` gathered per token (GatherND) into a batched MatMul, the form
  transformers' `batched_mm` experts export to.
* `torch_threads(device)`: small per-layer torch work on one CPU thread.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from optc.ir import (
    DataType,
    Node,
    Value,
    annotation,
    constant_array,
    is_constant,
    node_label,
    source_name,
)
from optc.ir.annotations import SOURCE_ALIASES
from optc.ir.patterns.ops import GEMM_OPS
from optc.ir.patterns.weights import weight_view

FLOAT_TYPES = (DataType.FLOAT, DataType.FLOAT16, DataType.BFLOAT16)


@dataclass(frozen=True)
class _WeightRows(ABC):
    """What `Linear` and `Experts` share: a constant weight read along `k_axis`, named by `node`."""

    node: Node
    weight: Value
    k_axis: int

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[self.k_axis])

    @property
    def label(self) -> str:
        return node_label(self.node)

    @abstractmethod
    def rows(self) -> np.ndarray:
        """The weight as float32 rows `[outputs, K]`."""

    def matrix(self, device: Any = None) -> Any:
        """`rows()` as a float32 torch tensor on `device` (CPU by default)."""
        import torch

        return torch.from_numpy(self.rows()).to(device or "cpu")


@dataclass(frozen=True)
class Linear(_WeightRows):
    """A linear layer `Y = X·W`: the node, its constant weight and the weight's K (reduction) axis
    (0 for MatMul / Gemm(transB=0), 1 for Gemm(transB=1))."""

    @property
    def activation(self) -> Value:
        return self.node.inputs[0]

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1 - self.k_axis])

    def nk(self) -> np.ndarray:
        """The weight as float32 `[N, K]`."""
        w = constant_array(self.weight).astype(np.float32)
        return np.ascontiguousarray(w.T if self.k_axis == 0 else w)

    def rows(self) -> np.ndarray:
        return self.nk()


def linear(node: Node) -> Linear | None:
    """The `Linear` view of `node` when it is X·W with a constant 2-D float W, else None."""
    view = weight_view(node, through=(), ops=GEMM_OPS)  # the weight itself, no op in between
    if view is None:
        return None
    w = view.constant
    if w.shape is None or len(w.shape) != 2 or w.dtype not in FLOAT_TYPES:
        return None
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        if trans_a is not None and trans_a.as_int():
            return None
    return Linear(node, w, view.k_axis)


@dataclass(frozen=True)
class Experts(_WeightRows):
    """Stacked expert weights `W [E, ...]` that a GatherND (`node`) picks per token for a batched MatMul.

    `k_axis` is W's reduction axis: 2 when the gathered `[T, N, K]` is the MatMul's left operand
    (transformers' layout, `W[e]` is `[out, in]`), 1 when the gathered `[T, K, N]` is its right one.
    """

    @property
    def count(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[3 - self.k_axis])

    def enk(self) -> np.ndarray:
        """The weights as float32 `[E, N, K]` (each expert a `[N, K]` matrix)."""
        w = constant_array(self.weight).astype(np.float32)
        return np.ascontiguousarray(w if self.k_axis == 2 else w.transpose(0, 2, 1))

    def rows(self) -> np.ndarray:
        """Every expert's rows stacked, `[E·N, K]`: rows are independent in group quantization, so
        `matrix()` quantizes each expert as its own matrix."""
        return self.enk().reshape(-1, self.in_features)


def experts(node: Node) -> Experts | None:
    """The `Experts` view of a GatherND (batch_dims 0) of a constant 3-D float weight, with one index
    per row, whose output only MatMuls read, all at the same operand; else None."""
    if node.op_type != "GatherND" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    batch_dims = node.attributes.get("batch_dims")
    if batch_dims is not None and batch_dims.as_int() != 0:
        return None
    weight, indices = node.inputs
    if not is_constant(weight) or weight.shape is None or len(weight.shape) != 3 or weight.dtype not in FLOAT_TYPES:
        return None
    if indices is None or indices.shape is None or len(indices.shape) < 1 or indices.shape[-1] != 1:
        return None
    if any(use.node is not node for use in weight.uses()) or weight.is_graph_output():
        return None
    gathered = node.outputs[0]
    uses = list(gathered.uses())
    positions = {use.idx for use in uses}
    if gathered.is_graph_output() or any(use.node.op_type != "MatMul" for use in uses) or len(positions) != 1:
        return None
    return Experts(node, weight, 2 if positions == {0} else 1)


def layer_names(node: Node, weight: Value | None) -> list[str]:
    """The names a pattern may match: node, outputs, and the weight's name, original parameter name and aliases."""
    names = [node_label(node), *(o.name for o in node.outputs if o.name)]
    if weight is not None:
        names += [weight.name or "", source_name(weight), *(annotation(weight, SOURCE_ALIASES) or [])]
    return [n for n in names if n]


def matches_any(names: Iterable[str], patterns: Iterable[str]) -> bool:
    """True when a pattern (substring, or glob with * ? [) matches one of `names`."""
    names = list(names)
    for pattern in patterns:
        glob = any(ch in pattern for ch in "*?[")
        if any(fnmatch.fnmatchcase(n, pattern) if glob else pattern in n for n in names):
            return True
    return False


@contextlib.contextmanager
def torch_threads(device: Any = None) -> Iterator[None]:
    """Run small per-layer torch work on one CPU thread (`OPTC_TORCH_THREADS` to change), then restore.

    torch's OpenMP threads spin-wait: on a loaded 2-core machine SparseGPT's column loop ran 12x
    slower with 2 threads than with 1, and GPTQ's elementwise ops 8x (measured). A CUDA `device`
    is left alone.
    """
    import torch

    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("OPTC_TORCH_THREADS", "1"))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["FLOAT_TYPES", "Experts", "Linear", "experts", "layer_names", "linear", "matches_any", "torch_threads"]
