"""`shape-infer`: ONNX shape and type inference, merged into the IR's values."""

from __future__ import annotations

import onnx
import onnx.shape_inference

from optc.ir import Model, Shape, from_proto, to_proto
from optc.passes.infra.analysis import ACTIVATIONS, WEIGHTS, AnalysisManager, PreservedAnalyses
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass

#: Initializers up to this many elements are kept for data propagation (Reshape targets...).
_KEEP_ELEMENTS = 4096


@register_pass("shape-infer")
class ShapeInference(Pass):
    """Infer the type and shape of every value (large weights are declared, never read)."""

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        proto = to_proto(model, max_elements=_KEEP_ELEMENTS)
        # Large initializers are declared in value_info; make them typed graph inputs.
        kept = {t.name for t in proto.graph.initializer}
        inputs = {i.name for i in proto.graph.input}
        large = [v for v in proto.graph.value_info if v.name in graph.initializers and v.name not in kept]
        for info in large:
            if info.name not in inputs:
                proto.graph.input.append(info)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types
            raise RuntimeError(f"onnx shape inference failed: {str(exc).strip().splitlines()[0]}") from exc
        typed = from_proto(inferred)
        source = {v.name: v for n in typed.graph for v in n.outputs}
        updated = 0
        for node in graph:
            for value in node.outputs:
                found = source.get(value.name)
                if found is None:
                    continue
                changed = False
                if value.type is None and found.type is not None:
                    value.type = found.type
                    changed = True
                if found.shape is not None and (value.shape is None or _less_known(value.shape, found.shape)):
                    value.shape = Shape(list(found.shape))
                    changed = True
                updated += changed
        preserved = PreservedAnalyses().preserve_aspects(ACTIVATIONS, WEIGHTS)
        return PassResult(model, bool(updated), preserved if updated else None, {"values-typed": updated})


def _less_known(current: Shape, inferred: Shape) -> bool:
    """True when `inferred` knows a dimension that `current` leaves symbolic or unknown."""
    if len(current) != len(inferred):
        return False
    return any(not isinstance(c, int) and isinstance(i, int) for c, i in zip(current, inferred, strict=True))
