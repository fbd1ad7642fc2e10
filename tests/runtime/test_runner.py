"""ModelRunner: sessions without onnxruntime's arena give the same values; freeing memory is harmless."""

from __future__ import annotations

import numpy as np

from optc.runtime.ort import open_session
from optc.runtime.runner import ModelRunner, release_free_memory
from tests.fixtures import quant_models as qm


def test_the_runner_session_has_no_arena_and_the_same_outputs(tmp_path):
    from optc.ir import save_model

    model = qm.to_ir(qm.llama_block(), vocab=64)
    path = save_model(model, tmp_path / "m.onnx")
    feed = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8) % 64}
    expected = open_session(path, optimize=False).run(None, feed)
    with ModelRunner(model) as runner:
        assert runner.session.get_session_options().enable_cpu_mem_arena is False
        got = runner.run(feed)
    for name, array in zip(runner.output_names, expected, strict=True):
        np.testing.assert_array_equal(got[name], array)
    release_free_memory()  # malloc_trim(0) on glibc, nothing elsewhere; callable any number of times
    release_free_memory()
