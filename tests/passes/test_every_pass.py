"""Every registered pass leaves a verifiable IR, on every model of the zoo.

Containers (`fixpoint`, which needs nested passes) are skipped. A pass may refuse
a model it does not apply to by raising `PreconditionError`; anything else it
raises is a failure, and whatever it returns must pass `optc.ir.verify` and
`onnx.checker`.
"""

from __future__ import annotations

import pytest

from optc.errors import PassFailure, PreconditionError
from optc.ir import check_onnx, verify
from optc.passes import AnalysisManager, PassContext, PassManager, VerifyEach, all_passes
from tests.fixtures import models
from tests.fixtures import text_models as tm

_CONFIG = {"calibration.spec": "random", "calibration.samples": 2, "calibration.seqlen": 8}


def _leaf_passes() -> list[str]:
    return [name for name, cls in all_passes().items() if not getattr(cls, "container", False)]


def _zoo():
    zoo = {name: (lambda name=name: models.to_ir(getattr(models, name)())) for name in models.BUILDERS}
    zoo["messy"] = tm.messy_model
    zoo["random-dag"] = lambda: tm.random_dag(3)
    return zoo


_MODELS = _zoo()


@pytest.mark.parametrize("model_name", sorted(_MODELS))
@pytest.mark.parametrize("pass_name", _leaf_passes())
def test_pass_leaves_verifiable_ir(pass_name, model_name):
    model = _MODELS[model_name]()
    verify(model, where="before the pass (test model)")
    pass_ = all_passes()[pass_name]()
    am = AnalysisManager(PassContext(config=dict(_CONFIG), instruments=[VerifyEach()]))
    try:
        result = PassManager([pass_])(model, am)  # as a pipeline runs it (distill's teacher is the input)
    except PreconditionError as exc:
        pytest.skip(f"{pass_name} does not apply to {model_name}: {exc}")
    except PassFailure as failure:
        if not isinstance(failure.cause, PreconditionError):
            raise
        pytest.skip(f"{pass_name} does not apply to {model_name}: {failure.cause}")
    verify(result.model, where=f"after '{pass_name}' on {model_name}")
    check_onnx(result.model)


def test_the_builtin_cleanup_passes_are_covered():
    assert {"dce", "cse", "fold-constants", "topo-sort", "shape-infer"} <= set(_leaf_passes())
    assert "fixpoint" not in _leaf_passes()
