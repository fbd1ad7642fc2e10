"""onnxruntime sessions on IR files, with the options every optc run and benchmark shares."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

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
