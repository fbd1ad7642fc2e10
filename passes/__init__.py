"""Passes, analyses and the infrastructure that runs them.

Write a pass:

    from optc.passes import Pass, PassResult, register_pass

    @register_pass("drop-identity")
    class DropIdentity(Pass):
        \"\"\"Remove Identity nodes.\"\"\"

        def run(self, model, am):
            ...
            return PassResult(model, modified=changed)
"""

from optc.passes.infra.analysis import (
    ACTIVATIONS,
    ASPECTS,
    STRUCTURE,
    WEIGHTS,
    Analysis,
    AnalysisManager,
    PreservedAnalyses,
)
from optc.passes.infra.context import PassContext
from optc.passes.infra.instruments import (
    AnalysisCounter,
    PassInstrument,
    PrintIRAfterChange,
    StatisticsInstrument,
    TimingInstrument,
    VerifyEach,
)
from optc.passes.infra.options import NoOptions, option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.pass_manager import Fixpoint, PassManager
from optc.passes.infra.pipeline import parse_pipeline, print_pipeline
from optc.passes.infra.registry import (
    ENTRY_POINT_GROUP,
    all_analyses,
    all_passes,
    all_pipelines,
    get_analysis,
    get_pass,
    register_analysis,
    register_pass,
    register_pipeline,
)
from optc.passes.infra.remarks import Remark, RemarkError, RemarkPrinter

__all__ = [
    "ACTIVATIONS",
    "ASPECTS",
    "ENTRY_POINT_GROUP",
    "STRUCTURE",
    "WEIGHTS",
    "Analysis",
    "AnalysisCounter",
    "AnalysisManager",
    "Fixpoint",
    "NoOptions",
    "Pass",
    "PassContext",
    "PassInstrument",
    "PassManager",
    "PassResult",
    "PreservedAnalyses",
    "PrintIRAfterChange",
    "Remark",
    "RemarkError",
    "RemarkPrinter",
    "StatisticsInstrument",
    "TimingInstrument",
    "VerifyEach",
    "all_analyses",
    "all_passes",
    "all_pipelines",
    "get_analysis",
    "get_pass",
    "option",
    "parse_pipeline",
    "print_pipeline",
    "register_analysis",
    "register_pass",
    "register_pipeline",
]
