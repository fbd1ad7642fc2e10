"""The ONNX Runtime backend: writes ONNX (external data when large) and opens a session on it."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from optc.backends.base import Artifact, Backend, register_backend
from optc.errors import OptcError
from optc.ir import Model, model_size_bytes, save_model, verify
from optc.ir.io import staged_to_output
from optc.passes.infra.context import PassContext

#: Session config entries added to every session `open_session` makes (after its own), e.g.
#: {"session.qdq_matmulnbits_accuracy_level": "0"} from a benchmark that scores files as written.
SESSION_CONFIG: dict[str, str] = {}
#: onnxruntime graph transformers every session `open_session` makes leaves out (benchmarks working
#: around an onnxruntime bug on a peer's model set it).
DISABLED_OPTIMIZERS: list[str] = []


def open_session(path: Path, *, optimize: bool = True, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session; with `optimize=False` weights are used in place (no prepacking).

    The module's `SESSION_CONFIG` entries and `DISABLED_OPTIMIZERS` apply to every session.

    onnxruntime memory-maps external data and, without optimizations or
    prepacking, never touches it while building the session, so the runtime
    check of a multi-gigabyte model costs ~60 MiB. Prepacking alone copies
    every MatMul weight (peak RSS above the model's size; measured by
    tools/bench_large_model.py), which is why the check must keep it off.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS) or None)


@register_backend
class OrtBackend(Backend):
    """ONNX for onnxruntime; the file is loaded into an InferenceSession before it is kept."""

    name = "ort"
    suffixes = (".onnx",)
    #: 8-bit Q/DQ rewritten into the forms onnxruntime's CPU kernels run fastest, exactly
    #: (passes/transforms/ort_int8_lowering.py; measured by tools/bench_ort_int8_forms.py).
    #: Weight-only 2-4-bit MatMuls run as MatMulNBits (passes/transforms/ort_nbits_lowering.py; tools/bench_w4.py);
    #: 5-8-bit weight-only weights are folded to float at load by lower-ort-int8 (faster than MatMulNBits bits=8).
    legalize = "lower-ort-nbits,lower-ort-int8"

    def lower(self, model: Model, output: Path, context: PassContext) -> Artifact:
        verify(model, where="before lowering to ort")
        checks: list[str] = []

        def check(staged: Path) -> None:
            if context.get("backend.skip_runtime_check"):
                return
            try:
                session = open_session(staged, optimize=False, threads=1)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                detail = staged_to_output(detail, staged, output)  # the staging folder is gone by now
                raise OptcError(f"onnxruntime rejected the lowered model: {detail}") from exc
            names = ", ".join(i.name for i in session.get_inputs())
            checks.append(f"onnxruntime {ort.__version__} loaded it (inputs: {names})")

        path = save_model(model, output, check=check)
        return Artifact(path, self.name, model_size_bytes(path), checks)
