"""`optc.runtime.ort.open_session`: the session options optc's runs and benchmarks rely on."""

from __future__ import annotations

import onnx

import optc.runtime.ort as ort_backend
from tests.fixtures import models


def test_open_session_adds_config_entries_and_disabled_optimizers(tmp_path, monkeypatch):
    path = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), path)
    monkeypatch.setitem(ort_backend.SESSION_CONFIG, "session.qdq_matmulnbits_accuracy_level", "0")
    session = ort_backend.open_session(path)
    assert session.get_session_options().get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"

    monkeypatch.setitem(ort_backend.SESSION_CONFIG, "session.intra_op.allow_spinning", "0")
    monkeypatch.setattr(ort_backend, "DISABLED_OPTIMIZERS", ["ConstantFolding"])
    session = ort_backend.open_session(path, optimize=False, threads=1)
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    feeds = models.random_inputs(models.mlp())
    assert [o.shape for o in session.run(None, feeds)] == [o.shape for o in models.run_ort(models.mlp(), feeds)]
