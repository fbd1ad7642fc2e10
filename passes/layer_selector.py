"""The one layer selector of the weight passes: which layers a pass takes, and why it leaves one out.

Every weight pass takes `exclude=PATTERNS` (and `sparsify`/`lowrank` also `include=PATTERNS`). A
pattern matches a layer's names (`optc.passes.linear_layers.layer_names`: the node, its outputs,
its weight, the weight's original parameter name and aliases), as a substring, or as a glob with
`* ? [`. `DEFAULT_EXCLUDES` holds every pass's default `exclude`, so they are read in one place; the
patterns come from the architecture registry (`optc.architectures`: each family's `keep_float` and
`embeddings`), so a new family brings its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from optc.architectures import embedding_patterns, keep_float_patterns
from optc.ir import Node, Value
from optc.passes.linear_layers import layer_names, matches_any

#: What quantizers leave in float by default: every family's `keep_float` (output heads, MoE routers).
OUTPUT_HEAD: tuple[str, ...] = keep_float_patterns()
#: The output heads and the embedding tables: what structural passes leave alone by default.
HEAD_AND_EMBEDDINGS: tuple[str, ...] = OUTPUT_HEAD + tuple(p for p in embedding_patterns() if p not in OUTPUT_HEAD)

#: Each weight pass's default `exclude=` (prune-ffn, prune-heads and kquant take no `exclude`).
DEFAULT_EXCLUDES: dict[str, tuple[str, ...]] = {
    "quantize": OUTPUT_HEAD,
    "smoothquant": OUTPUT_HEAD,  # quantize's, so the layers it leaves float are not smoothed either
    "rtn": OUTPUT_HEAD,
    "gptq": OUTPUT_HEAD,
    "awq": OUTPUT_HEAD,
    "sparsify": HEAD_AND_EMBEDDINGS,
    "lowrank": HEAD_AND_EMBEDDINGS,
}


def default_exclude(pass_name: str) -> list[str]:
    """The default `exclude=` of `pass_name`, as the list an option holds."""
    return list(DEFAULT_EXCLUDES[pass_name])


@dataclass(frozen=True)
class LayerSelector:
    """`exclude` (and, when given, `include`) name patterns; says whether a layer is selected and, if not, why."""

    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()  # empty: every layer

    @classmethod
    def of(cls, exclude: Iterable[str] = (), include: Iterable[str] = ()) -> LayerSelector:
        return cls(tuple(exclude), tuple(include))

    def why_not(self, node: Node, weight: Value | None = None) -> str | None:
        """Why the layer (`node`, reading `weight`) is left out, or None when it is selected.

        An excluded layer names the patterns that matched it, not the whole default list.
        """
        if not self.include and not self.exclude:
            return None
        names = layer_names(node, weight)
        if self.include and not matches_any(names, self.include):
            return "not included (include=" + ",".join(self.include) + ")"
        matched = [pattern for pattern in self.exclude if matches_any(names, (pattern,))]
        if matched:
            return "excluded (exclude=" + ",".join(matched) + ")"
        return None

    def selects(self, node: Node, weight: Value | None = None) -> bool:
        return self.why_not(node, weight) is None


__all__ = ["DEFAULT_EXCLUDES", "HEAD_AND_EMBEDDINGS", "OUTPUT_HEAD", "LayerSelector", "default_exclude"]
