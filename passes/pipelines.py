"""Built-in container passes and named pipelines."""

from optc.passes.infra.pass_manager import Fixpoint
from optc.passes.infra.registry import register_pass, register_pipeline

register_pass("fixpoint")(Fixpoint)

register_pipeline(
    "cleanup",
    "fixpoint(fold-constants,cse,dce),topo-sort",
    "fold constants, merge duplicates and remove dead code until nothing changes",
)
