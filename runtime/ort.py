"""onnxruntime sessions on IR files, with the options every optc run and benchmark shares."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from optc.errors import OptcError, first_line
from optc.ir.io import staged_to_output
from optc.runtime.decoder import is_past

#: Session config entries added to every session `open_session` makes (after its own), e.g.
#: {"session.qdq_matmulnbits_accuracy_level": "0"} from a benchmark that scores files as written.
SESSION_CONFIG: dict[str, str] = {}
#: onnxruntime graph transformers every session `open_session` makes leaves out (benchmarks working
#: around an onnxruntime bug on a peer's model set it).
DISABLED_OPTIMIZERS: list[str] = []


def open_session(path: Path | bytes, *, optimize: bool = True, threads: int = 0, arena: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session (of a file, or of a serialized model); with `optimize=False` weights are
    used in place (no prepacking).

    `arena=False` turns off onnxruntime's CPU memory arena: each tensor is allocated and freed on its own,
    so what a session computed (a 4-bit block's dequantized weights, say) goes back to the C allocator
    when it is freed instead of staying in arena regions the process keeps. The results are the same.

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
    if not arena:
        options.enable_cpu_mem_arena = False
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS) or None)


def runtime_check(staged: Path, output: Path, model_kind: str) -> str:
    """Load a backend's staged file into a session (weights untouched): the report's check line.

    Raises `OptcError` with onnxruntime's first line, naming `output` where it named the staged
    file (the staging folder is gone by the time the user reads it).
    """
    try:
        session = open_session(staged, optimize=False, threads=1)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        detail = first_line(exc, limit=None)
        detail = staged_to_output(detail, staged, output)
        raise OptcError(f"onnxruntime rejected the {model_kind} model: {detail}") from exc
    names = [i.name for i in session.get_inputs()]
    past = [name for name in names if is_past(name)]
    if past:  # a KV-cache decoder: its past inputs as one range, not one name per layer and tensor
        names = [name for name in names if not is_past(name)] + [f"past_key_values.0-{len(past) // 2 - 1}.key/value"]
    return f"onnxruntime {ort.__version__} loaded it (inputs: {', '.join(names)})"
