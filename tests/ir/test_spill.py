"""The spill file: rewritten weights moved to a file beside the output and memory-mapped back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from optc.driver import CompileOptions, compile_file
from optc.ir import ExternalTensor, add_initializer, has_external_data, load_model, save_model
from optc.ir.spill import SpillFile, in_memory_bytes, is_spilled
from tests.fixtures import quant_models as qm


def _block(tmp_path: Path, *, external: bool) -> Path:
    path = tmp_path / "block.onnx"
    proto = qm.llama_block(hidden=128, ffn=256)
    if external:
        onnx.save(proto, str(path), save_as_external_data=True, location="block.onnx.data", size_threshold=0)
    else:
        onnx.save(proto, str(path))
    return path


def test_spilled_weights_read_back_and_save_the_same_bytes(tmp_path: Path) -> None:
    model = load_model(_block(tmp_path, external=False))
    rng = np.random.default_rng(0)
    int8 = add_initializer(model.graph, "extra_int8", rng.integers(-128, 127, size=(64, 32), dtype=np.int8))
    small = add_initializer(model.graph, "small", np.arange(4, dtype=np.float32))
    expected = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    (tmp_path / "plain").mkdir()
    save_model(model, tmp_path / "plain" / "m.onnx")
    large = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value.nbytes >= 1024)
    with SpillFile(tmp_path, "m.onnx") as spill:
        assert spill.spill(model) == large and spill.path is not None and spill.path.parent == tmp_path
        assert is_spilled(int8.const_value) and isinstance(int8.const_value, ExternalTensor)
        assert not is_spilled(small.const_value)  # under SPILL_MIN_BYTES: stays in memory
        assert 0 < in_memory_bytes(model) < 1024 * len(model.graph.initializers)
        for name, value in model.graph.initializers.items():
            np.testing.assert_array_equal(value.const_value.numpy(), expected[name])
        assert not has_external_data(model)  # spilled weights are not the model's own external data
        (tmp_path / "spilled").mkdir()
        save_model(model, tmp_path / "spilled" / "m.onnx")
        assert spill.spill(model) == 0  # nothing left in memory to move
    assert not spill.path.exists()
    plain, spilled = (tmp_path / d / "m.onnx" for d in ("plain", "spilled"))
    assert sorted(p.name for p in spilled.parent.iterdir()) == ["m.onnx"]
    assert spilled.read_bytes() == plain.read_bytes()


def test_a_run_over_its_memory_budget_spills_and_writes_the_same_files(tmp_path: Path) -> None:
    source = _block(tmp_path, external=True)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(3).integers(0, 64, size=(2, 8), dtype=np.int64))
    written = {}
    for label, budget in (("roomy", None), ("tight", "256K")):  # 0.7 MB of weights > a quarter of 256 KiB
        folder = tmp_path / label
        folder.mkdir()
        options = CompileOptions(passes="rtn{bits=8 group=128}", calib=f"npz:{calib}", skip_runtime_check=True,
                                 memory_budget=budget)
        compile_file(source, folder / "out.onnx", options)
        written[label] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert sorted(written["tight"]) == ["out.onnx", "out.onnx.data"]  # the spill file is gone
    assert written["tight"] == written["roomy"]


def test_the_builder_spills_new_initializers_at_once_when_a_file_is_attached(tmp_path: Path) -> None:
    from optc.ir.patterns.builder import Builder
    from optc.ir.spill import attach, detach

    model = load_model(_block(tmp_path, external=False))
    with SpillFile(tmp_path, "m.onnx") as spill:
        attach(model, spill)
        try:
            big = Builder(model.graph).initializer("w_q", np.ones((64, 64), dtype=np.int8))
            small = Builder(model.graph).initializer("s", np.ones(4, dtype=np.float32))
        finally:
            detach(model)
        assert is_spilled(big.const_value) and not is_spilled(small.const_value)
        np.testing.assert_array_equal(big.const_value.numpy(), np.ones((64, 64), dtype=np.int8))
        after = Builder(model.graph).initializer("w2", np.ones((64, 64), dtype=np.int8))
        assert not is_spilled(after.const_value)  # detached: new weights stay in memory


def test_calib_blocks_on_spills_rewritten_weights_whatever_the_budget(tmp_path: Path) -> None:
    """`--calib-blocks on` asks for the streaming path: weights a pass rewrites (smoothquant scales every
    weight) go to a spill file even when the budget would hold them; `auto` with room keeps them in RAM."""
    from optc.driver import _spill_file

    model = qm.to_ir(qm.llama_block())
    out = tmp_path / "out.onnx"
    spill = _spill_file(model, out, CompileOptions(calib_blocks="on", memory_budget="64G"), True)
    assert isinstance(spill, SpillFile)
    spill.close()
    assert _spill_file(model, out, CompileOptions(calib_blocks="auto", memory_budget="64G"), True) is None
    assert _spill_file(model, out, CompileOptions(calib_blocks="off", memory_budget="64G"), True) is None
    source = _block(tmp_path, external=True)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(3).integers(0, 64, size=(2, 8), dtype=np.int64))
    written = {}
    for mode in ("off", "on"):
        folder = tmp_path / mode
        folder.mkdir()
        options = CompileOptions(passes="w8a8", calib=f"npz:{calib}", skip_runtime_check=True, calib_blocks=mode)
        compile_file(source, folder / "out.onnx", options)
        written[mode] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert written["on"] == written["off"]  # the spill file is gone and the output is the same
