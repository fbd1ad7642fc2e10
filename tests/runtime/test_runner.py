"""ModelRunner: a session over the model in memory (large weights fed as inputs, nothing written), without
onnxruntime's arena, gives the values of a session over the saved file; freeing memory is harmless."""

from __future__ import annotations

import numpy as np
import pytest

from optc.runtime import runner as runner_module
from optc.runtime.ort import open_session
from optc.runtime.runner import ModelRunner, release_free_memory
from tests.fixtures import quant_models as qm


@pytest.mark.parametrize("feed_min_bytes", [0, 1 << 16, 1 << 40])
def test_the_runner_feeds_large_weights_writes_nothing_and_gives_the_same_values(tmp_path, monkeypatch, feed_min_bytes):
    from optc.ir import save_model

    monkeypatch.setattr(runner_module, "FEED_MIN_BYTES", feed_min_bytes)
    model = qm.to_ir(qm.llama_block(), vocab=64)
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    feed = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8) % 64}
    expected = open_session(path, optimize=False).run(None, feed)
    large = {name for name, v in model.graph.initializers.items() if v.const_value.nbytes >= feed_min_bytes}
    with ModelRunner(model, ["attn"]) as runner:
        assert runner._folder is None  # no temporary copy of the model
        assert set(runner._fed) == large
        assert runner.input_names == ["input_ids"]
        assert runner.session.get_session_options().enable_cpu_mem_arena is False
        got = runner.run(feed)
    assert runner.output_names[-1] == "attn"
    for name, array in zip(runner.output_names[:-1], expected, strict=True):
        np.testing.assert_array_equal(got[name], array)
    assert all(v.const_value is not None and v.const_value.nbytes for v in model.graph.initializers.values())


def test_release_free_memory_can_be_called_any_time():
    release_free_memory()  # malloc_trim(0) on glibc, nothing elsewhere
    release_free_memory()


def test_spilled_4bit_weights_run_without_being_unpacked_into_memory(tmp_path):
    """A block run again after GPTQ inlines its spilled 4-bit codes: the bytes are read from the spill file and
    the tensors stay unloaded (onnx-ir's `tobytes()` would keep an unpacked byte-per-value copy of each)."""
    from optc.ir import DataType, ExternalTensor, save_model
    from optc.ir.spill import SpillFile
    from optc.passes import parse_pipeline
    from optc.runtime.runner import stored_bytes
    from tests.passes import lowbit_helpers as h

    model = parse_pipeline("rtn{bits=4 group=16 symmetric=false}")(qm.to_ir(qm.llama_block(), vocab=64), h.am()).model
    feed = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8) % 64}
    expected = open_session(save_model(model, tmp_path / "m.onnx", external_data=True), optimize=False).run(None, feed)
    with SpillFile(tmp_path, min_bytes=1) as spill:
        assert spill.spill(model) > 0
        packed = {name: v.const_value for name, v in model.graph.initializers.items()
                  if isinstance(v.const_value, ExternalTensor) and v.const_value.dtype in (DataType.UINT4, DataType.INT4)}
        assert packed
        for tensor in packed.values():  # the packed bytes, as a fresh tensor over the same file gives them
            fresh = ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                                   base_dir=tensor.base_dir, name=tensor.name)
            assert stored_bytes(tensor) == fresh.tobytes()
            fresh.release()
        with ModelRunner(model) as runner:
            got = runner.run(feed)
        assert all(tensor.raw is None for tensor in packed.values())  # none was loaded (nor unpacked)
        for name, array in zip(runner.output_names, expected, strict=True):
            np.testing.assert_array_equal(got[name], array)
