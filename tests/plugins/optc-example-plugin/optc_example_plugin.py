"""An example optc plugin: the `drop-identity` pass.

A plugin is an ordinary Python distribution. Its pass subclasses `Pass`,
registers a kebab-case name with `@register_pass`, declares typed options as a
dataclass, and returns a `PassResult` from `run`. The distribution names the
class in the `optc.passes` entry-point group (see pyproject.toml); once it is
installed, the pass is listed by `optc --list-passes` and runs in pipelines:

    optc model.onnx --passes='drop-identity{graph-outputs=rewire},cleanup' -o out.onnx
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from optc.ir import Model
from optc.passes import (
    WEIGHTS,
    AnalysisManager,
    Pass,
    PassResult,
    PreservedAnalyses,
    option,
    register_pass,
)


@register_pass("drop-identity")
class DropIdentity(Pass):
    """Remove Identity nodes, wiring their consumers straight to their input."""

    # Options parse from `drop-identity{graph-outputs=rewire keep=a,b}`; the
    # field types decide what is accepted and `--list-passes` shows the help.
    @dataclasses.dataclass
    class Options:
        graph_outputs: Literal["keep", "rewire"] = option(
            "keep", help="Identity making a graph output: keep it, or give its name to its input"
        )
        keep: list[str] = option([], help="names of Identity nodes to leave in place")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        removed = 0
        for node in list(graph):  # top-level graph only
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                continue
            if node.name in self.options.keep:
                continue
            (source,) = node.inputs
            (result,) = node.outputs
            if result.is_graph_output():
                # The graph output's name must survive, so the input takes it; that is
                # only possible for a value computed inside the graph and output once.
                movable = source.producer() is not None and not source.is_graph_output()
                if self.options.graph_outputs == "keep" or not movable:
                    continue
                name, result.name = result.name, None
                result.replace_all_uses_with(source, replace_graph_outputs=True)
                source.name = name
            else:
                result.replace_all_uses_with(source)
            graph.remove(node, safe=True)
            removed += 1
        if not removed:
            return PassResult(model, modified=False, statistics={"identities-removed": 0})
        # Weights are untouched; values were renamed, so other analyses are dropped.
        preserved = PreservedAnalyses().preserve_aspects(WEIGHTS)
        return PassResult(model, True, preserved, statistics={"identities-removed": removed})
